"""Fail at build time, with the numbers, when the Ray cluster can never hold one replica.

Serve reserves each replica's bundles (placement.py) as one placement group and waits for
it. On a cluster that is too small and cannot grow, that wait never ends: `serve run ...
tensor_parallel_size=2` on a 2-core machine needs 3 logical CPUs (the replica's bundle and
one per rank), and Ray only logs "taken more than 30s to be scheduled" every 30 s. So
build_app looks first: if no autoscaler can add nodes and the cluster's nodes (their
totals, not what is free now: other apps finish) can never hold the group, it refuses.
Where an autoscaler can add nodes (Anyscale, KubeRay, `ray up`), it waits, as before.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

Resources = dict[str, float]


class PlacementError(ValueError):
    """One replica's placement group can never be scheduled on this cluster."""


@dataclass(frozen=True)
class ClusterView:
    """Alive nodes' total resources, whether they can grow, and where the view comes from."""

    nodes: list[Resources]
    can_grow: bool
    source: str


def _fits(bundle: Resources, node: Resources) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in bundle.items() if amount > 0)


def _total(bundles: list[Resources]) -> Resources:
    total: Resources = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def _one_per_node(bundles: list[Resources], nodes: list[Resources]) -> bool:
    """Each bundle on a distinct node (bipartite matching, Kuhn's augmenting paths)."""
    owner: dict[int, int] = {}  # node -> bundle

    def place(b: int, seen: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n not in seen and _fits(bundles[b], node):
                seen.add(n)
                if n not in owner or place(owner[n], seen):
                    owner[n] = b
                    return True
        return False

    return all(place(b, set()) for b in range(len(bundles)))


def placement_shortfall(bundles: list[Resources], strategy: str, nodes: list[Resources]) -> Optional[str]:
    """Why `bundles` can never be placed on `nodes` with `strategy`, or None if they can.

    Exact for STRICT_PACK and STRICT_SPREAD. For PACK and SPREAD (any packing over nodes)
    only necessary conditions are checked, so a group that might fit is never refused.
    """
    if strategy == "STRICT_PACK":
        need = _total(bundles)
        if not any(_fits(need, node) for node in nodes):
            return f"no node has {_describe(need)} for all {len(bundles)} bundles together"
        return None
    for bundle in bundles:
        if not any(_fits(bundle, node) for node in nodes):
            return f"no node has {_describe(bundle)} for bundle {bundle}"
    if strategy == "STRICT_SPREAD":
        if not _one_per_node(bundles, nodes):
            return f"STRICT_SPREAD needs {len(bundles)} distinct nodes that each hold a bundle"
        return None
    need, have = _total(bundles), _total(nodes)
    short = {name: amount for name, amount in need.items() if have.get(name, 0.0) < amount}
    if short:
        return f"the whole cluster has less than the {_describe(short)} the bundles need ({strategy})"
    return None


def _describe(resources: Resources) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()) if amount > 0)


def _describe_nodes(nodes: list[Resources]) -> str:
    shown = [{k: v for k, v in node.items() if k in ("CPU", "GPU")} for node in nodes]
    return f"{len(nodes)} node(s): " + "; ".join(_describe(node) or "no CPU" for node in shown)


def check_cluster_fits(bundles: list[Resources], strategy: str, view: Optional[ClusterView],
                       anywhere: Optional[list[Resources]] = None) -> None:
    """Raise PlacementError, naming bundles, cluster and the fix, if the group can never fit.

    `anywhere`: actors placed outside the group, on any node (api_replicas' HTTP replicas):
    the cluster must hold them beside it, counted in its totals."""
    if view is None or not view.nodes:
        return
    shortfall = placement_shortfall(bundles, strategy, view.nodes)
    if shortfall is None and anywhere:
        if not all(any(_fits(actor, node) for node in view.nodes) for actor in anywhere):
            shortfall = f"no node can hold one of its HTTP replicas ({_describe(anywhere[0])})"
        need, have = _total(bundles + anywhere), _total(view.nodes)
        short = {name: amount for name, amount in need.items() if have.get(name, 0.0) < amount}
        if short and shortfall is None:
            shortfall = (f"with its {len(anywhere)} HTTP replicas ({_describe(_total(anywhere))}) beside it the "
                         f"whole cluster has less than the {_describe(short)} they need")
    if shortfall is None:
        return
    if view.can_grow:
        logger.warning("serve_tp: %s has no room for one replica (%s); waiting for its autoscaler to add "
                       "nodes", view.source, shortfall)
        return
    cpus = math.ceil(_total(bundles).get("CPU", 0.0))
    raise PlacementError(
        f"the Ray cluster can never hold one replica: its placement group is {len(bundles)} bundles "
        f"{bundles} (bundle 0 the replica, then one per rank, {strategy}) and {shortfall}; "
        f"{view.source} has {_describe_nodes(view.nodes)}, and no autoscaler to add nodes. "
        f"Give Ray more logical CPUs (ranks mostly wait on each other, so more than the cores is fine "
        f"on CPU): `ray start --head --num-cpus {cpus}`, then run this again; or lower "
        f"replica_cpus / cpus_per_rank (e.g. 0.5), or tensor_parallel_size."
    )


# ---- looking at the cluster ----

def _readonly_node_type(node_id: str) -> str:
    """The node type Ray's monitor invents for each node when it has no autoscaling config."""
    from ray.autoscaler._private.util import format_readonly_node_type

    return format_readonly_node_type(node_id)


def configured_autoscaler_in(status: Optional[bytes]) -> bool:
    """Whether the monitor's status report (internal KV `__autoscaling_status`) comes from an
    autoscaler with node types of its own (`ray up`, KubeRay), not the read-only monitor
    that every head node runs, which names each node's type after the node."""
    if not status:
        return False
    report = json.loads(status).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != _readonly_node_type(node_id) for node_id, node_type in mapping.items())


def scalable_cluster_config(config) -> bool:
    """Ray Data's test (is_autoscaling_enabled): a reported node group may grow."""
    if config is None:
        return False
    return any(group.max_count == -1 or group.max_count > group.min_count
               for group in config.node_group_configs if group.resources and group.max_count != 0)


def autoscaler_can_add_nodes() -> bool:
    """On the connected cluster: did an autoscaler report node groups that grow (Anyscale,
    autoscaler v2), or is a configured v1 autoscaler running?"""
    import ray._private.state
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    if scalable_cluster_config(ray._private.state.state.get_cluster_config()):
        return True
    return configured_autoscaler_in(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS))


def _serve_run_context():
    """click's context when build_app is called by `serve run`, else None."""
    try:
        import click
    except ImportError:
        return None
    context = click.get_current_context(silent=True)
    return context if context is not None and "address" in context.params else None


def _local_machine() -> Resources:
    """What `ray.init()` would give a new local instance on this machine."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager
    from ray._private.utils import get_num_cpus

    return {"CPU": float(get_num_cpus()),
            "GPU": float(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators() or 0)}


def _connected_view(source: str) -> ClusterView:
    import ray

    nodes = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node["Alive"]]
    return ClusterView(nodes, autoscaler_can_add_nodes(), source)


def observe_cluster() -> Optional[ClusterView]:
    """The cluster this app's replicas will be placed on, or None where it cannot be known.

    Connected (Serve config deploys, `serve.run` after ray.init): that cluster. Built by
    `serve run module:build_app`, which builds before it calls ray.init(address=--address):
    the cluster that call will find (--address, RAY_ADDRESS, the last `ray start` here),
    looked at through a short connection, else the local instance it will start on this
    machine. Any other caller not yet connected may still call ray.init its own way
    (num_cpus=...), so nothing can be said.
    """
    import ray

    if ray.is_initialized():
        return _connected_view(f"the Ray cluster at {ray.get_runtime_context().gcs_address}")
    context = _serve_run_context()
    if context is None:
        return None
    from ray._private.services import canonicalize_bootstrap_address

    address = context.params["address"]
    if address and address.startswith("ray://"):
        return None  # Ray Client: looking would mean starting a client session
    try:
        bootstrap = canonicalize_bootstrap_address(address)
    except Exception as exc:  # ray.init will report it in its own words
        logger.info("serve_tp: cannot tell which Ray cluster to check (%s)", exc)
        return None
    if bootstrap is None:
        return ClusterView([_local_machine()], False,
                           "this machine (no Ray cluster is running, so `serve run` starts a local Ray instance)")
    try:
        ray.init(address=bootstrap, log_to_driver=False, logging_level=logging.WARNING)
        return _connected_view(f"the Ray cluster at {bootstrap}")
    except Exception as exc:
        logger.info("serve_tp: could not look at the Ray cluster at %s (%s)", bootstrap, exc)
        return None
    finally:
        ray.shutdown()  # `serve run` connects again, with its own runtime_env
