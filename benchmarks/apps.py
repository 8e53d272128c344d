"""The Serve apps the benchmark starts itself (serve_tp, the tutorial), on a local or joined Ray."""

from __future__ import annotations

import argparse
import logging
import os
import socket

logger = logging.getLogger(__name__)

TUTORIAL_APP, TUTORIAL_PREFIX = "tutorial", "/tutorial"
SERVE_TP_APP = "serve_tp"


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Apps:
    """The Serve apps this script starts, on a local Ray or a joined one; removed at the end."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started: list[str] = []
        self.own_ray = False

    def _ray(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            return
        a = self.args
        if a.ray_address:
            ray.init(address=a.ray_address, logging_level=logging.WARNING)
        else:
            if _port_in_use(a.serve_port):
                raise SystemExit(
                    f"port {a.serve_port} is taken (a `serve run` of serve_tp?). Join its cluster with "
                    f"--ray-address auto (after `ray start --head`), or pick another --serve-port"
                )
            # Logical CPUs: bundles of both apps must fit even on a 2-core machine; the ranks
            # only heartbeat while another target is measured.
            need = 2 * (a.tensor_parallel_size + 1)  # serve_tp's and the tutorial's bundles
            # address="local": a fresh instance even if another one (a test's, a `serve run`) is up.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                     include_dashboard=False, logging_level=logging.WARNING)
            self.own_ray = True
        serve.start(http_options={"host": "127.0.0.1", "port": a.serve_port})

    def start(self, name: str, app, route_prefix: str) -> None:
        from ray import serve

        self._ray()
        logger.info("starting Serve app %s at %s (model load and group setup)", name, route_prefix)
        serve.run(app, name=name, route_prefix=route_prefix)
        self.started.append(name)

    def start_tutorial(self) -> str:
        from benchmarks.tutorial_app import build_app

        a = self.args
        self.start(TUTORIAL_APP, build_app({
            "model": a.model, "served_model_name": a.served_model_name,
            "tensor_parallel_size": a.tensor_parallel_size, "device": a.device,
        }), TUTORIAL_PREFIX)
        return f"http://127.0.0.1:{a.serve_port}{TUTORIAL_PREFIX}"

    def start_serve_tp(self) -> str:
        from serve_tp.api.app import build_app

        a = self.args
        extra = dict(kv.split("=", 1) for kv in a.serve_tp_arg)
        self.start(SERVE_TP_APP, build_app({
            "model": a.model, "served_model_name": a.served_model_name,
            "tensor_parallel_size": a.tensor_parallel_size, "device": a.device, **extra,
        }), "/")
        return f"http://127.0.0.1:{a.serve_port}"

    def stop(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        if self.own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            for name in self.started:
                serve.delete(name)
