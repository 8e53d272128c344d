"""CPU time of each process on serve_tp's HTTP path, per benchmark level (same machine only).

Where the time goes under load: the process that answers the client's port (Serve's
Python proxy, HAProxy, or the replica itself with direct ingress), the replica (FastAPI,
tokenizer, detokenizer, SSE), rank 0 (scheduler, sampler, the outputs it is polled for),
rank 1, and this load generator. CPU seconds, not wall time: on a small shared machine
wall time counts other processes' work too, CPU time only the process's own.
"""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import urlparse

import psutil


def _listener(port: int) -> Optional[int]:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def direct_ingress_port(replica_pid: int, low: int = 30000, high: int = 31000) -> Optional[int]:
    """The HTTP port a direct-ingress replica listens on (Serve allocates it in [low, high))."""
    for conn in psutil.Process(replica_pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and low <= conn.laddr.port < high:
            return conn.laddr.port
    return None


def serving_processes(base_url: str, health: dict) -> dict[str, int]:
    """Role -> pid, from /health (replica, ranks) and whoever listens on the client's port."""
    roles = {"replica": health["replica"]["pid"]}
    for rank in health.get("ranks", []):
        if "pid" in rank:
            roles[f"rank{rank['rank']}"] = rank["pid"]
    front = _listener(urlparse(base_url).port or 80)
    if front is not None and front != roles["replica"]:
        name = psutil.Process(front).name()
        if "haproxy" in name:
            roles["haproxy"] = front
            parent = psutil.Process(front).parent()  # HAProxyManager: config and health, off the data path
            if parent is not None:
                roles["haproxy_manager"] = parent.pid
        else:
            roles["proxy"] = front
    roles["client"] = os.getpid()
    return roles


def _cpu_s(pid: int) -> Optional[float]:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    # HAProxy runs its work in threads of one process; children (none expected) would be missed.
    return times.user + times.system


class CpuMeter:
    """CPU seconds of each role between `start` and `stop`."""

    def __init__(self, roles: dict[str, int]):
        self.roles = roles
        self._before: dict[str, Optional[float]] = {}

    def start(self) -> None:
        self._before = {role: _cpu_s(pid) for role, pid in self.roles.items()}

    def stop(self) -> dict[str, float]:
        spent = {}
        for role, pid in self.roles.items():
            after, before = _cpu_s(pid), self._before.get(role)
            if after is not None and before is not None:
                spent[role] = round(after - before, 4)
        return spent


def per_unit(cpu_s: dict[str, float], requests: int, chunks: int, tokens: int) -> dict[str, dict[str, float]]:
    """ms of CPU per request, per streamed text chunk and per output token, for each role."""
    out = {}
    for role, seconds in cpu_s.items():
        out[role] = {
            "cpu_s": seconds,
            "ms_per_request": round(1000 * seconds / requests, 3) if requests else None,
            "ms_per_chunk": round(1000 * seconds / chunks, 4) if chunks else None,
            "ms_per_token": round(1000 * seconds / tokens, 4) if tokens else None,
        }
    return out
