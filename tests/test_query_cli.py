"""query.py run as users run it: a subprocess, against real HTTP servers.

Failures come from a tiny server started here (it answers each request with one fixed
status and body, and records what it was sent); successes from the real serve_tp app
(the `serve_app` fixture of conftest.py), cross-checked with the official openai client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_query(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("BASE_URL", "SERVICE_TOKEN")}
    return subprocess.run(
        [sys.executable, str(ROOT / "query.py"), *args],
        env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, result
    line = result.stderr.strip()
    assert "\n" not in line, f"expected one line on stderr, got: {result.stderr!r}"
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


class FixedResponseServer(ThreadingHTTPServer):
    """Answers every request with one status and body; remembers each request's headers."""

    daemon_threads = True

    def __init__(self, status: int, body: bytes, content_type: str):
        self.status, self.body, self.content_type = status, body, content_type
        self.requests: list[tuple[str, str, dict]] = []
        super().__init__(("127.0.0.1", 0), FixedResponseHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FixedResponseHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.requests.append((self.command, self.path, dict(self.headers)))
        self.send_response(self.server.status)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def fixed_server(request) -> Iterator[FixedResponseServer]:
    status, body, content_type = request.param
    server = FixedResponseServer(status, body, content_type)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def openai_error(status: int, message: str, kind: str) -> tuple[int, bytes, str]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return status, json.dumps(body).encode(), "application/json"


@pytest.mark.parametrize(
    "fixed_server",
    [openai_error(401, "Invalid bearer token", "authentication_error")],
    indirect=True,
)
def test_401_reports_status_and_message_and_sends_the_env_token(fixed_server) -> None:
    result = run_query("hi", env={"BASE_URL": fixed_server.url, "SERVICE_TOKEN": "s3cret"})
    assert_one_line_failure(result, "401", "Invalid bearer token")
    method, path, headers = fixed_server.requests[0]
    assert headers.get("Authorization") == "Bearer s3cret"
    assert (method, path) == ("GET", "/v1/models")  # no --model: it asks the server which


@pytest.mark.parametrize(
    "fixed_server",
    [openai_error(403, "Token lacks access", "permission_error")],
    indirect=True,
)
def test_403_reports_status_and_message(fixed_server) -> None:
    result = run_query("hi", "--base-url", fixed_server.url, "--model", "gpt2", "--token", "t")
    assert_one_line_failure(result, "403", "Token lacks access")
    assert fixed_server.requests[0][:2] == ("POST", "/v1/completions")


@pytest.mark.parametrize(
    "fixed_server",
    [openai_error(404, "The model 'nope' does not exist", "not_found_error")],
    indirect=True,
)
@pytest.mark.parametrize("stream", [True, False])
def test_404_reports_status_and_message(fixed_server, stream: bool) -> None:
    args = ["hi", "--base-url", fixed_server.url + "/v1/", "--model", "nope"]
    result = run_query(*args, *([] if stream else ["--no-stream"]))
    assert_one_line_failure(result, "404", "The model 'nope' does not exist")
    assert fixed_server.requests[0][1] == "/v1/completions"  # a trailing /v1/ is not doubled
    assert result.stdout == ""


@pytest.mark.parametrize(
    "fixed_server",
    [(500, b"Internal Server Error\nTraceback: ...", "text/plain")],
    indirect=True,
)
def test_500_with_a_plain_text_body(fixed_server) -> None:
    result = run_query("hi", "--base-url", fixed_server.url, "--model", "gpt2")
    assert_one_line_failure(result, "500", "Internal Server Error")


@pytest.mark.parametrize("fixed_server", [(200, b"<html>Sign in</html>", "text/html")], indirect=True)
@pytest.mark.parametrize("stream, fragment", [(True, "ended before"), (False, "unexpected answer")])
def test_a_200_that_is_not_an_openai_answer(fixed_server, stream: bool, fragment: str) -> None:
    result = run_query("hi", "--base-url", fixed_server.url, "--model", "m", *([] if stream else ["--no-stream"]))
    assert_one_line_failure(result, fragment)


def test_refused_connection() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago; nothing listens now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_query("hi", "--base-url", f"http://127.0.0.1:{port}")
    assert_one_line_failure(result, f"127.0.0.1:{port}", "refused")


def test_server_that_never_answers_times_out() -> None:
    # The kernel completes the handshake into the listen backlog; nobody ever accepts.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = run_query("hi", "--base-url", url, "--model", "gpt2", "--timeout", "1", timeout=30)
    assert_one_line_failure(result, "timed out", "1s")


# --- against the real serve_tp service ---------------------------------------------------


def expected_text(serve_app, prompt: str, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_app.base_url}/v1", api_key="unused", timeout=120)
    completion = client.completions.create(
        model=serve_app.model_name, prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    return completion.choices[0].text


@pytest.mark.parametrize("stream", [True, False])
def test_completion_from_serve_tp_matches_the_openai_client(serve_app, stream: bool) -> None:
    prompt, max_tokens = "The quick brown fox", 8
    args = [prompt, "--max-tokens", str(max_tokens), "--temperature", "0"]
    result = run_query(*args, *([] if stream else ["--no-stream"]), env={"BASE_URL": serve_app.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # Greedy decoding: streamed chunks joined, the whole answer and the openai client agree.
    assert result.stdout == expected_text(serve_app, prompt, max_tokens) + "\n"


def test_unknown_model_on_serve_tp_is_a_one_line_404(serve_app) -> None:
    result = run_query("hi", "--base-url", serve_app.base_url, "--model", "no-such-model")
    assert_one_line_failure(result, "404")
