"""Faults: a rank that dies or hangs turns into fast errors, then Serve heals the replica."""

import os
import signal
import time

import httpx
import pytest
from ray import serve

from tests.conftest import deploy

FAST_HEALTH = dict(health_check_period_s=1, health_check_timeout_s=4, replica_cpus=0.5, cpus_per_rank=0.5)


def ranks(url):
    r = httpx.get(f"{url}/health", timeout=10)
    return r.status_code, (r.json().get("ranks") if r.status_code == 200 else None)


def greedy(url, prompt="Hello world.", timeout=30):
    return httpx.post(f"{url}/v1/completions", timeout=timeout,
                      json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})


def wait_for_new_group(url, old_pids, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, info = ranks(url)
            if status == 200 and not ({r["pid"] for r in info} & old_pids):
                return info
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("replica was not replaced")


@pytest.fixture
def app_url(serve_app, request):
    name = request.node.name.split("[")[0][-30:]
    url = deploy(name, f"/{name}", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 request_timeout_s=5, stall_timeout_s=5, **FAST_HEALTH)
    yield url
    serve.delete(name)


@pytest.mark.slow
def test_killed_rank_gives_503_then_the_replica_is_replaced(app_url, serve_app):
    expected = greedy(app_url).json()["choices"][0]["text"]
    _, info = ranks(app_url)
    old_pids = {r["pid"] for r in info}
    os.kill(info[1]["pid"], signal.SIGKILL)
    started = time.monotonic()
    r = greedy(app_url, timeout=30)
    assert r.status_code in (503, 504), r.text  # never a hang, never a 200 with garbage
    assert time.monotonic() - started < 10
    assert "error" in r.json()
    new = wait_for_new_group(app_url, old_pids)
    assert len(new) == 2
    assert greedy(app_url).json()["choices"][0]["text"] == expected


@pytest.mark.slow
def test_hung_rank_times_out_and_is_replaced(app_url):
    expected = greedy(app_url).json()["choices"][0]["text"]
    _, info = ranks(app_url)
    old_pids = {r["pid"] for r in info}
    os.kill(info[1]["pid"], signal.SIGSTOP)  # stuck in the middle of the group's collectives
    try:
        started = time.monotonic()
        r = greedy(app_url, timeout=30)
        assert r.status_code in (503, 504), r.text
        assert time.monotonic() - started < 15
        wait_for_new_group(app_url, old_pids)
        assert greedy(app_url).json()["choices"][0]["text"] == expected
    finally:
        try:
            os.kill(info[1]["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def deployment_message(app: str) -> str:
    """What `serve status` shows for the app's deployment."""
    return serve.status().applications[app].deployments["InferenceDeployment"].message


def test_startup_error_names_the_numbers(serve_app):
    """More ranks (7) than heads (6): `serve status` says why, with both numbers."""
    from serve_tp.api.app import build_app

    with pytest.raises(RuntimeError):
        serve.run(build_app({"model": serve_app.model_dir, "tensor_parallel_size": 7, "device": "cpu",
                             "replica_cpus": 0.25, "cpus_per_rank": 0.25}), name="badtp", route_prefix="/badtp")
    message = deployment_message("badtp")
    serve.delete("badtp")
    assert "tensor_parallel_size (7) is larger than the number of attention heads (6)" in message


def test_bad_model_path_fails_at_startup_with_its_name(serve_app, tmp_path):
    from serve_tp.api.app import build_app

    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError):
        serve.run(build_app({"model": str(missing), "tensor_parallel_size": 2, "device": "cpu",
                             "replica_cpus": 0.25, "cpus_per_rank": 0.25}), name="badpath", route_prefix="/badpath")
    message = deployment_message("badpath")
    serve.delete("badpath")
    assert f"model directory {missing} does not exist" in message
