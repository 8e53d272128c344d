"""Scale-out: several replicas, each its own TP group; ranks spread over Ray nodes."""

import json
import os
import subprocess
import sys

import httpx
import pytest
import ray
from ray import serve
from ray.util import placement_group_table

from tests.conftest import deploy


def greedy(base_url, prompt, max_tokens=10):
    return greedy_response(base_url, prompt, max_tokens).json()["choices"][0]["text"]


def greedy_response(base_url, prompt, max_tokens=10):
    r = httpx.post(f"{base_url}/v1/completions", timeout=60,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r


def until_both(fetch, tries=40):
    """`fetch()` -> (replica id, value) until two replicas have answered; {id: [values]}."""
    seen: dict[str, list] = {}
    for _ in range(tries):
        replica, value = fetch()
        seen.setdefault(replica, []).append(value)
        if len(seen) == 2 and sum(map(len, seen.values())) >= 8:
            break
    return seen


def test_two_replicas_are_two_tp_groups_that_both_answer_alike(serve_app):
    url = deploy("replicas", "/replicas", model=serve_app.model_dir, tensor_parallel_size=2,
                 device="cpu", num_replicas=2, replica_cpus=0.5, cpus_per_rank=0.5)
    try:
        status = serve.status().applications["replicas"].deployments["InferenceDeployment"]
        assert status.replica_states.get("RUNNING") == 2
        groups = [pg for pg in placement_group_table().values()
                  if pg["state"] == "CREATED" and pg["strategy"] == "STRICT_PACK"
                  and list(pg["bundles"].values()) == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]]
        assert len(groups) == 2  # one placement group per replica: replica bundle + 2 ranks

        def answer():
            r = greedy_response(url, "Hello world.")
            return r.headers["x-serve-tp-replica"], r.json()["choices"][0]["text"]

        # Serve picks a replica per request; both must answer, each the unsharded-equal text.
        texts = until_both(answer)
        assert len(texts) == 2, {replica: len(t) for replica, t in texts.items()}
        expected = greedy(serve_app.base_url, "Hello world.")
        assert {replica: set(t) for replica, t in texts.items()} == {replica: {expected} for replica in texts}
        for replica in texts:  # the ids are the deployment's live replica actors
            ray.get_actor(f"SERVE_REPLICA::replicas#InferenceDeployment#{replica}", namespace="serve")

        def rank_pids():
            body = httpx.get(f"{url}/health", timeout=30).json()
            return body["replica"]["id"], frozenset(rank["pid"] for rank in body["ranks"])

        pids = {replica: set(p) for replica, p in until_both(rank_pids).items()}
        assert set(pids) == set(texts)
        first, second = (frozenset.union(*p) for p in pids.values())
        assert len(first) == len(second) == 2 and not first & second  # two TP groups of two ranks
    finally:
        serve.delete("replicas")


def test_placement_bundles_are_one_for_the_replica_and_one_per_rank():
    from serve_tp.config import ServeTPConfig
    from serve_tp.placement import deployment_placement

    cfg = ServeTPConfig(tensor_parallel_size=3, placement_strategy="SPREAD", cpus_per_rank=2)
    placement = deployment_placement(cfg, "cuda")
    assert placement["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 2.0, "GPU": 1}] * 3
    assert placement["placement_group_strategy"] == "SPREAD"
    assert placement["ray_actor_options"] == {"num_cpus": 1.0}


@pytest.mark.slow
def test_strict_spread_puts_ranks_on_distinct_nodes_and_answers_like_one_process(serve_app):
    """A 4-node Ray cluster (ray.cluster_utils.Cluster) in a child process."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.multinode_app", serve_app.model_dir, "STRICT_SPREAD", "8123"],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["nodes"] == 4
    node_ids = [rank["node_id"] for rank in report["ranks"]]
    assert len(set(node_ids)) == 2, node_ids
    for prompt, text in report["texts"].items():
        assert text == greedy(serve_app.base_url, prompt, 12)
