"""Run in its own process: a several-node Ray cluster on this machine, the app with ranks
spread over nodes, and greedy answers compared with one unsharded process.

    python -m tests.multinode_app MODEL_DIR STRATEGY PORT   → prints a JSON report
"""

import json
import sys
import time

import httpx


def main(model_dir: str, strategy: str, port: int) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_tp.api.app import build_app

    env = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(3):  # STRICT_SPREAD: the replica's bundle and each rank's on its own node
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        serve.run(build_app({"model": model_dir, "tensor_parallel_size": 2, "device": "cpu",
                             "placement_strategy": strategy}), name="spread", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("not healthy")
            time.sleep(0.5)
        ranks = httpx.get(f"{base}/health", timeout=10).json()["ranks"]
        texts = {}
        for prompt in ("Hello world.", "The quick brown fox"):
            r = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            texts[prompt] = r.json()["choices"][0]["text"]
        print("REPORT " + json.dumps({"ranks": ranks, "texts": texts, "nodes": len(ray.nodes())}))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
