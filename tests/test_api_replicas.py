"""api_replicas: several HTTP replicas in front of one TP group (TPGroupDeployment owns it).

The real app over HTTP on CPU, against the single-replica app (`serve_app`, the same TP=2
model): each HTTP replica must answer, attach to the same group, return what the one-replica
app returns under concurrent load (rank 0 keeps their outputs apart), and heal with it.
"""

import concurrent.futures
import os
import signal
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from tests.conftest import deploy
from tests.test_faults import FAST_HEALTH, greedy, ranks, wait_for_new_group
from tests.test_scale_out import until_both

APP = "api_replicas"


@pytest.fixture(scope="module")
def split_url(serve_app):
    url = deploy(APP, f"/{APP}", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu", api_replicas=2,
                 max_batch_size=16, max_prefill_tokens=32, request_timeout_s=60, stall_timeout_s=5, **FAST_HEALTH)
    yield url
    serve.delete(APP)


def completion(url, **body):
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"max_tokens": 12, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r


def test_two_http_replicas_attach_to_one_group_and_answer_as_one_replica_does(split_url, serve_app):
    deployments = serve.status().applications[APP].deployments
    assert deployments["InferenceDeployment"].replica_states.get("RUNNING") == 2
    assert deployments["TPGroupDeployment"].replica_states.get("RUNNING") == 1

    def health():
        body = httpx.get(f"{split_url}/health", timeout=30).json()
        return body["replica"]["id"], body

    seen = until_both(health)
    assert len(seen) == 2, list(seen)
    bodies = [answers[0] for answers in seen.values()]
    owners = {b["replica"]["group_owner"] for b in bodies}
    assert len(owners) == 1 and not owners & set(seen)  # one group, owned by neither HTTP replica
    owner = owners.pop()
    ray.get_actor(f"SERVE_REPLICA::{APP}#TPGroupDeployment#{owner}", namespace="serve")
    assert len({frozenset(r["pid"] for r in b["ranks"]) for b in bodies}) == 1  # the same two ranks
    assert all(b["admission"]["max_running"] == 32 for b in bodies)  # the group's 64, split in two
    assert all(not b["replica"]["torch_imported"] for b in bodies)

    prompt = "The quick brown fox"
    expected = completion(serve_app.base_url, prompt=prompt, temperature=0).json()["choices"][0]["text"]

    def answer():
        r = completion(split_url, prompt=prompt, temperature=0)
        return r.headers["x-serve-tp-replica"], r.json()["choices"][0]["text"]

    texts = until_both(answer)
    assert {replica: set(t) for replica, t in texts.items()} == {replica: {expected} for replica in seen}


def test_concurrent_streams_over_both_replicas_each_get_their_own_tokens(split_url, serve_app):
    """Rank 0 runs every stream in one batch while two replicas poll it: a token routed to the
    wrong replica would leave a stream short or mixed."""
    jobs = [dict(prompt=f"Story number {i}:", max_tokens=6 + 3 * (i % 5), temperature=0.9, seed=100 + i)
            for i in range(16)]
    expected = [completion(serve_app.base_url, **job).json()["choices"][0]["text"] for job in jobs]

    def stream(job):
        client = openai.OpenAI(base_url=f"{split_url}/v1", api_key="unused", max_retries=0)
        raw = client.completions.with_raw_response.create(model="tiny-gpt2", stream=True,
                                                          extra_body={"ignore_eos": True}, **job)
        text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
        return raw.headers["x-serve-tp-replica"], text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(stream, jobs))
    assert [text for _, text in results] == expected
    assert len({replica for replica, _ in results}) == 2  # both HTTP replicas streamed


@pytest.mark.slow
def test_a_killed_rank_heals_the_group_and_every_http_replica(split_url):
    expected = greedy(split_url).json()["choices"][0]["text"]
    _, info = ranks(split_url)
    old_pids = {r["pid"] for r in info}
    os.kill(info[1]["pid"], signal.SIGKILL)
    r = greedy(split_url, timeout=30)
    assert r.status_code in (503, 504), r.text  # never a hang, never a 200 with garbage
    wait_for_new_group(split_url, old_pids)

    deadline = time.monotonic() + 180

    def bound_to():  # (the HTTP replica that answered, its group's rank pids), from one response
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{split_url}/health", timeout=10)
                if "x-serve-tp-replica" in r.headers:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("no HTTP replica answered /health within 180 s of the new group")
        pids = frozenset(rank["pid"] for rank in r.json()["ranks"]) if r.status_code == 200 else None
        return r.headers.get("x-serve-tp-replica"), pids

    while time.monotonic() < deadline:
        seen = until_both(bound_to, tries=10)
        healed = {replica: pids[-1] for replica, pids in seen.items()}
        if len(healed) == 2 and all(p is not None and not p & old_pids for p in healed.values()):
            break
        time.sleep(1)
    assert len(healed) == 2 and all(p is not None and not p & old_pids for p in healed.values()), seen
    assert len(set(healed.values())) == 1  # both HTTP replicas on the one new group
    assert greedy(split_url).json()["choices"][0]["text"] == expected
