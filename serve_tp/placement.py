"""Placement of one replica and its ranks, computed from the config in one place."""

from __future__ import annotations

from typing import Optional

from serve_tp.config import ServeTPConfig


def rank_resources(config: ServeTPConfig, device: str) -> dict[str, float]:
    """What one rank actor reserves: a GPU on cuda, a CPU slot always."""
    resources = {"CPU": config.cpus_per_rank}
    if device == "cuda":
        resources["GPU"] = 1
    return resources


def replica_bundles(config: ServeTPConfig, device: str) -> list[dict[str, float]]:
    """Bundle 0 holds the replica (HTTP, tokenizer); bundle 1 + r holds rank r.

    Serve reserves these as the replica's own placement group, so every replica is a
    whole TP group that is scheduled, and replaced, as one unit.
    """
    return [{"CPU": config.replica_cpus}] + [
        rank_resources(config, device) for _ in range(config.tensor_parallel_size)
    ]


def rank_bundle_index(rank: int) -> int:
    return rank + 1


def ranks_share_one_node(config: ServeTPConfig, bundle_nodes: Optional[dict[int, str]]) -> bool:
    """Whether the placement group put every rank on one node (shared memory reaches them all).

    `bundle_nodes` maps bundle index to node id (the placement group's table), None when
    the ranks have no placement group: then they may be anywhere.
    """
    rank_nodes = {(bundle_nodes or {}).get(rank_bundle_index(r)) or None for r in range(config.tensor_parallel_size)}
    return len(rank_nodes) == 1 and None not in rank_nodes


def _nodes_message(config: ServeTPConfig, bundle_nodes: Optional[dict[int, str]]) -> str:
    nodes = {(bundle_nodes or {}).get(rank_bundle_index(r)) for r in range(config.tensor_parallel_size)} - {None}
    return f"the placement group put the {config.tensor_parallel_size} ranks on {len(nodes)} node(s) " \
           f"({config.placement_strategy})"


def _on_one_node(config: ServeTPConfig, bundle_nodes: Optional[dict[int, str]], field: str, required: str,
                 fallback: str) -> str:
    """A shared-memory setting given where the bundles landed: its value when every rank is
    on one node; else `fallback`, or a refusal when the value (`required`) insisted on it."""
    value = getattr(config, field)
    if ranks_share_one_node(config, bundle_nodes):
        return value
    if value == required:
        raise ValueError(f"{field} {required} needs every rank on one node; {_nodes_message(config, bundle_nodes)}: "
                         f"use STRICT_PACK, or {field} auto or {fallback}")
    return fallback


def resolve_cpu_all_reduce(config: ServeTPConfig, device: str, bundle_nodes: Optional[dict[int, str]]) -> str:
    """What the ranks are told about summing on CPU, given where the bundles landed."""
    if device != "cpu" or config.cpu_all_reduce == "gloo":
        return "gloo"
    return _on_one_node(config, bundle_nodes, "cpu_all_reduce", "shm", "gloo")


def resolve_plan_channel(config: ServeTPConfig, device: str, bundle_nodes: Optional[dict[int, str]]) -> str:
    """How rank 0's plans reach the other ranks: "shm" (a shared-memory ring) or "gloo".

    auto takes shared memory on cuda when every rank is on one node. On CPU it stays on
    gloo: the ring's readers poll, and there the cores belong to the forward pass.
    """
    if config.plan_channel == "gloo" or config.tensor_parallel_size == 1:
        return "gloo"
    channel = _on_one_node(config, bundle_nodes, "plan_channel", "shm", "gloo")
    if channel == "auto":
        return "shm" if device == "cuda" else "gloo"
    return channel


def resolve_gpu_all_reduce(config: ServeTPConfig, device: str, bundle_nodes: Optional[dict[int, str]]) -> str:
    """What the ranks are told about the decode all-reduce: p2p and symm_mem map peers' GPU
    memory, so they need every rank on one node (refused when asked for by name); elsewhere NCCL."""
    if device != "cuda" or config.gpu_all_reduce == "nccl" or config.tensor_parallel_size == 1:
        return "nccl"
    insisted = "" if config.gpu_all_reduce == "auto" else config.gpu_all_reduce
    return _on_one_node(config, bundle_nodes, "gpu_all_reduce", insisted, "nccl")


def deployment_placement(config: ServeTPConfig, device: str) -> dict:
    """The Serve deployment options that place a replica.

    STRICT_PACK by default: all ranks on one node, so the all-reduce in every layer runs
    over NVLink/PCIe rather than the network.
    """
    return {
        "placement_group_bundles": replica_bundles(config, device),
        "placement_group_strategy": config.placement_strategy,
        "ray_actor_options": {"num_cpus": config.replica_cpus},
    }
