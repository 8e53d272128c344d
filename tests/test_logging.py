"""Prompts and completions never reach the logs (Serve's, the replica's, the ranks')."""

import time
import uuid
from pathlib import Path

import httpx
import ray


def test_prompt_text_is_not_logged(serve_app):
    marker = f"secret-{uuid.uuid4().hex}"
    for body in ({"prompt": marker, "max_tokens": 3}, {"prompt": marker, "max_tokens": 0},
                 {"prompt": [marker, marker], "max_tokens": 2, "stream": True}):
        httpx.post(f"{serve_app.base_url}/v1/completions", json=body, timeout=60)
    httpx.get(f"{serve_app.base_url}/infer", params={"text": marker}, timeout=60)
    time.sleep(2)  # let buffered log lines reach their files
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("serve" in str(p) for p in files), "no Serve logs found to check"
    leaked = [str(p) for p in files if marker.encode() in p.read_bytes()]
    assert leaked == []
