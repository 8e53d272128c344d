"""Run in its own process: a real Ray cluster too small for a TP=2 replica (2 CPUs, no
autoscaler), and what build_app and `serve run` say about it.

    python -m tests.small_cluster_probe MODEL_DIR   → prints "REPORT {json}"
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build(args: dict) -> dict:
    """build_app's verdict on `args` and how long it took."""
    from serve_tp.api.app import build_app

    started = time.monotonic()
    try:
        build_app(args)
        error = None
    except Exception as exc:  # ConfigError is what we expect; anything else is reported
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "seconds": round(time.monotonic() - started, 2)}


def serve_run(address: str, model_dir: str) -> dict:
    """The real CLI, not yet connected to the cluster when it builds the app."""
    serve = str(Path(sys.executable).with_name("serve"))
    env = {**os.environ, "RAY_ADDRESS": address}
    started = time.monotonic()
    try:
        out = subprocess.run([serve, "run", "serve_tp.app:build_app", f"model={model_dir}",
                              "tensor_parallel_size=2", "device=cpu"],
                             env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return {"rc": None, "seconds": round(time.monotonic() - started, 1), "output": "timed out"}
    return {"rc": out.returncode, "seconds": round(time.monotonic() - started, 1),
            "output": (out.stdout + out.stderr)[-4000:]}


def main(model_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    report = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        tp2 = {"model": model_dir, "tensor_parallel_size": 2, "device": "cpu"}
        report["tp2"] = build(tp2)
        report["tp1"] = build({**tp2, "tensor_parallel_size": 1})  # control: 2 bundles of 1 CPU fit
        report["tp2_half_cpus"] = build({**tp2, "replica_cpus": 0.5, "cpus_per_rank": 0.5})
        report["tp2_wait_for_resources"] = build({**tp2, "wait_for_resources": True})
        ray.shutdown()
        report["serve_run"] = serve_run(cluster.address, model_dir)

        # What an autoscaler (Anyscale's, Ray's v2) tells the GCS: node groups it may start.
        from ray.core.generated import autoscaler_pb2

        ray.init(address=cluster.address, log_to_driver=False)
        config = autoscaler_pb2.ClusterConfig(node_group_configs=[autoscaler_pb2.NodeGroupConfig(
            name="cpu-workers", resources={"CPU": 4}, min_count=0, max_count=2)])
        ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
        report["tp2_with_autoscaler"] = build(tp2)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
