"""Serve application builder: `serve run serve_tp.app:build_app key=value ...`.

Follows Ray Serve's app-builder convention: one dict argument (the `args:` of a Serve
config, or `key=value` pairs from the CLI), validated once, here, at build time.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from serve_tp.api.admission import serve_routing_limit
from serve_tp.api.auth import api_key_digest
from serve_tp.cluster_fit import PlacementError, check_cluster_fits, observe_cluster
from serve_tp.config import ServeTPConfig
from serve_tp.api.deployment import InferenceDeployment
from serve_tp.api.group_deployment import TPGroupDeployment
from serve_tp.placement import deployment_placement

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad setting, named, caught before any replica starts."""


def parse_config(args: dict[str, Any]) -> ServeTPConfig:
    try:
        return ServeTPConfig.model_validate(dict(args))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid serve_tp settings: {problems}") from None


def cluster_gpus() -> float:
    """GPUs the Ray cluster offers now, or this machine's if no cluster is connected."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    return float(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators() or 0)


def resolve_device(config: ServeTPConfig) -> str:
    """auto → cuda when the cluster has GPUs. Autoscaling GPU clusters should say cuda."""
    if config.device != "auto":
        return config.device
    return "cuda" if cluster_gpus() >= 1 else "cpu"


def backpressure_options(config: ServeTPConfig) -> dict:
    """Serve's limits, around the replica's own queue (serve_tp/api/admission.py).

    The replica runs max_ongoing_requests and queues max_queued_requests itself, so that a
    refusal carries our error shape. Serve's router keeps a queue of max_queued_requests
    too, the only one while no replica is ready (starting, being replaced); its refusals
    carry the same status and Retry-After but Serve's plain-text body. It also counts
    requests it is still assigning, so a burst far larger than that queue is partly
    refused there even when the replica has room.
    """
    running, waiting = config.api_replica_limits()  # one HTTP replica's share of its group's
    if waiting < 0:  # unbounded: Serve's router holds the queue
        return {"max_ongoing_requests": running, "max_queued_requests": -1}
    return {
        "max_ongoing_requests": serve_routing_limit(running, waiting),
        "max_queued_requests": waiting,
        "backpressure_config": BackpressureConfig(
            status_code=config.overload_status_code, retry_after_s=config.overload_retry_after_s),
    }


def _health_options(config: ServeTPConfig) -> dict:
    return dict(health_check_period_s=config.health_check_period_s,
                health_check_timeout_s=config.health_check_timeout_s, graceful_shutdown_timeout_s=30)


def deployment_options(config: ServeTPConfig, device: str) -> dict:
    """The options of the deployment that owns the TP groups: InferenceDeployment, or with
    api_replicas > 1 TPGroupDeployment (its callers are the API replicas' `attach` alone)."""
    options = deployment_placement(config, device)
    options.update(_health_options(config))
    if config.api_replicas > 1:
        options["max_ongoing_requests"] = 4 * config.api_replicas  # attach calls, once per API replica start
    else:
        options.update(backpressure_options(config))
    if config.autoscaling_config is not None:
        options["autoscaling_config"] = config.autoscaling_config.model_dump()
    else:
        options["num_replicas"] = config.num_replicas
    return options


def api_deployment_options(config: ServeTPConfig) -> dict:
    """The HTTP replicas of api_replicas > 1 (one group): replica_cpus each and no GPU, placed
    anywhere (they reach rank 0 over Ray), each admitting its share of the group's limits."""
    return {
        "num_replicas": config.api_replicas,
        "ray_actor_options": {"num_cpus": config.replica_cpus},
        **backpressure_options(config),
        **_health_options(config),
    }


def build_app(args: dict[str, Any]) -> Application:
    config = parse_config(args)
    device = resolve_device(config)
    try:
        config.resolved_dtype(device)  # the dtype rule (and decode_attention's), now that 'auto' has a device
    except ValueError as exc:
        raise ConfigError(f"{exc} (device resolved from '{config.device}')") from None
    options = deployment_options(config, device)
    if not config.wait_for_resources:
        try:
            http_replicas = [{"CPU": config.replica_cpus}] * config.api_replicas if config.api_replicas > 1 else None
            check_cluster_fits(options["placement_group_bundles"], config.placement_strategy, observe_cluster(),
                               http_replicas)
        except PlacementError as exc:
            raise ConfigError(str(exc)) from None
    settings = config.model_dump(mode="json")
    if config.api_replicas == 1:
        logger.info("serve_tp: %s on %s, options %s", config.model, device, options)
        return InferenceDeployment.options(**options).bind(settings, device, api_key_digest())
    http_options = api_deployment_options(config)
    logger.info("serve_tp: %s on %s, group options %s, %d HTTP replicas' options %s", config.model, device,
                options, config.api_replicas, http_options)
    groups = TPGroupDeployment.options(**options).bind(settings, device)
    return InferenceDeployment.options(**http_options).bind(settings, device, api_key_digest(), groups)
