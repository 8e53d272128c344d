"""A start that explains itself: build_app refuses, in seconds and with the numbers, a
cluster that can never hold one replica, and waits where an autoscaler can add nodes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_tp.cluster_fit import (
    ClusterView, PlacementError, check_cluster_fits, configured_autoscaler_in, placement_shortfall,
    scalable_cluster_config,
)

ONE, GPU = {"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}
TP2_CPU = [ONE, ONE, ONE]


def test_strict_pack_needs_one_node_with_the_sum():
    assert placement_shortfall(TP2_CPU, "STRICT_PACK", [{"CPU": 3.0}]) is None
    assert placement_shortfall(TP2_CPU, "STRICT_PACK", [{"CPU": 2.0}, {"CPU": 2.0}]) == \
        "no node has 3 CPU for all 3 bundles together"
    gpu_group = [ONE, GPU, GPU]
    assert placement_shortfall(gpu_group, "STRICT_PACK", [{"CPU": 16.0, "GPU": 2.0}]) is None
    assert "2 GPU" in placement_shortfall(gpu_group, "STRICT_PACK", [{"CPU": 16.0, "GPU": 1.0}] * 2)


def test_strict_spread_needs_distinct_nodes_that_each_hold_a_bundle():
    assert placement_shortfall(TP2_CPU, "STRICT_SPREAD", [ONE, ONE, ONE]) is None
    assert placement_shortfall(TP2_CPU, "STRICT_SPREAD", [{"CPU": 8.0}, ONE]) is not None
    # A matching exists only if the GPU bundles take the GPU nodes: greedy order would miss it.
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert placement_shortfall([ONE, GPU, GPU], "STRICT_SPREAD", nodes) is None
    assert placement_shortfall([ONE, GPU, GPU, GPU], "STRICT_SPREAD", nodes + [{"CPU": 9.0}]) is not None


def test_pack_and_spread_refuse_only_what_can_never_fit():
    two_small = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert placement_shortfall(TP2_CPU, "PACK", two_small) is None  # 2 + 1 over two nodes
    assert placement_shortfall(TP2_CPU, "SPREAD", [{"CPU": 2.0}]) is not None  # 3 > 2 in all
    assert "no node has 1 CPU, 1 GPU for bundle" in placement_shortfall([ONE, GPU], "PACK", two_small)


def test_check_refuses_names_the_fix_and_lets_an_autoscaler_grow():
    small = [{"CPU": 2.0, "memory": 8e9}]
    with pytest.raises(PlacementError) as caught:
        check_cluster_fits(TP2_CPU, "STRICT_PACK", ClusterView(small, False, "the Ray cluster at x:1"))
    message = str(caught.value)
    for part in ("3 bundles [{'CPU': 1.0}, {'CPU': 1.0}, {'CPU': 1.0}]", "no node has 3 CPU",
                 "the Ray cluster at x:1 has 1 node(s): 2 CPU", "ray start --head --num-cpus 3"):
        assert part in message
    check_cluster_fits(TP2_CPU, "STRICT_PACK", ClusterView(small, True, "c"))  # waits for new nodes
    check_cluster_fits(TP2_CPU, "STRICT_PACK", None)  # cluster not visible: nothing to say
    check_cluster_fits(TP2_CPU, "STRICT_PACK", ClusterView([{"CPU": 3.0}], False, "c"))


def test_autoscaler_signals():
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    node = "c9f85271ec766ce2"
    readonly = {"autoscaler_report": {"node_type_mapping": {node: f"node_{node}"}}}
    configured = {"autoscaler_report": {"node_type_mapping": {node: "ray.head.default"}}}
    assert not configured_autoscaler_in(json.dumps(readonly).encode())  # every head runs this monitor
    assert configured_autoscaler_in(json.dumps(configured).encode())
    assert not configured_autoscaler_in(None)

    def config(min_count, max_count):
        return ClusterConfig(node_group_configs=[
            NodeGroupConfig(name="w", resources={"CPU": 4}, min_count=min_count, max_count=max_count)])

    assert scalable_cluster_config(config(0, 2)) and scalable_cluster_config(config(0, -1))
    assert not scalable_cluster_config(config(2, 2)) and not scalable_cluster_config(None)


@pytest.mark.slow
def test_a_real_cluster_too_small_is_refused_in_seconds(tiny_model_dir):
    """2 CPUs, no autoscaler: TP=2 needs 3. build_app (connected) and `serve run` (not yet
    connected, the cluster found through RAY_ADDRESS) both refuse; a group that fits, the
    wait_for_resources setting and an autoscaler's report all let it through."""
    out = subprocess.run([sys.executable, "-m", "tests.small_cluster_probe", tiny_model_dir],
                         capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    refused = report["tp2"]
    assert refused["error"].startswith("ConfigError: the Ray cluster can never hold one replica")
    assert "has 1 node(s): 2 CPU" in refused["error"] and "--num-cpus 3" in refused["error"]
    assert refused["seconds"] < 10
    for fits in ("tp1", "tp2_half_cpus", "tp2_wait_for_resources", "tp2_with_autoscaler"):
        assert report[fits]["error"] is None, (fits, report[fits])
    cli = report["serve_run"]
    assert cli["rc"] not in (0, None), cli
    assert "can never hold one replica" in cli["output"] and "--num-cpus 3" in cli["output"]
    assert cli["seconds"] < 60, cli


def test_bare_serve_run_on_a_machine_too_small_fails_before_starting_ray(tiny_model_dir, tmp_path):
    """No cluster running (a Ray temp dir of its own): `serve run` would start a local
    instance with this machine's CPUs; the app asks for more than any machine has."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    serve = str(Path(sys.executable).with_name("serve"))
    started = time.monotonic()
    proc = subprocess.Popen([serve, "run", "serve_tp.app:build_app", f"model={tiny_model_dir}", "device=cpu",
                             "tensor_parallel_size=2", "cpus_per_rank=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # it started Ray and waits: the check did not fire
        raise
    assert proc.returncode != 0
    assert "can never hold one replica" in output and "this machine (no Ray cluster is running, so `serve run`" in output
    assert "no node has 200001 CPU" in output
    assert "Started a local Ray instance" not in output
    assert time.monotonic() - started < 60


def test_a_caller_not_yet_connected_outside_serve_run_is_not_judged(tmp_path):
    """Such a caller may still ray.init(num_cpus=...) as it likes (benchmarks/bench_serving.py
    does): this machine's cores say nothing about that cluster."""
    code = "from serve_tp.cluster_fit import observe_cluster; print('VIEW', observe_cluster())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_TMPDIR": str(tmp_path)})
    assert "VIEW None" in out.stdout, out.stdout + out.stderr


def test_http_replicas_of_api_replicas_count_beside_the_group():
    group = [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # the owner + 2 ranks
    cluster = ClusterView([{"CPU": 4.0}], False, "the Ray cluster at x:1")
    check_cluster_fits(group, "STRICT_PACK", cluster, [{"CPU": 1.0}])  # 3 + 1 of 4
    with pytest.raises(PlacementError, match="2 HTTP replicas"):
        check_cluster_fits(group, "STRICT_PACK", cluster, [{"CPU": 1.0}] * 2)  # 3 + 2 of 4
    two_nodes = ClusterView([{"CPU": 4.0}, {"CPU": 4.0}], False, "c")
    with pytest.raises(PlacementError, match="no node can hold one of its HTTP replicas"):
        check_cluster_fits(group, "STRICT_PACK", two_nodes, [{"CPU": 5.0}])  # 8 in all, 4 a node
