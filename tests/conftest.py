"""Shared fixtures: a tiny offline GPT-2, a real local Ray cluster, the real Serve app."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

SERVE_PORT = int(os.environ.get("SERVE_TP_TEST_PORT", "8000"))


@dataclass
class RunningApp:
    base_url: str
    model_name: str
    model_dir: str


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from serve_tp.model.tiny_model import build_tiny_gpt2

    return str(build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session; logical CPUs so TP groups fit on 2 cores."""
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    yield
    serve.shutdown()
    ray.shutdown()


def wait_healthy(base_url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not healthy after {timeout}s")


def deploy(name: str, route_prefix: str, **args) -> str:
    """serve.run the real app builder with `args`; returns its base URL."""
    from ray import serve

    from serve_tp.api.app import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    base_url = f"http://127.0.0.1:{SERVE_PORT}{route_prefix.rstrip('/')}"
    wait_healthy(base_url)
    return base_url


@pytest.fixture(scope="session")
def serve_app(ray_cluster, tiny_model_dir) -> RunningApp:
    """The app as users run it: TP=2 on CPU over HTTP, served as 'tiny-gpt2'. Its prefill
    budget is small for the tiny model's 256-token context, so longer prompts (lm_eval's
    contexts, the long-prompt tests) reach every API path prefilled in several chunks."""
    base_url = deploy(
        "serve_tp", "/", model=tiny_model_dir, tensor_parallel_size=2, device="cpu",
        max_batch_size=16, request_timeout_s=60, max_prefill_tokens=32,
    )
    return RunningApp(base_url, Path(tiny_model_dir).name, tiny_model_dir)
