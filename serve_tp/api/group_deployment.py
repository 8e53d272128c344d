"""TPGroupDeployment: a Serve replica that owns one TP group and serves no HTTP.

With api_replicas > 1 the HTTP work of a group (parsing, tokenizing, detokenizing, SSE) is
spread over several InferenceDeployment replicas, as vLLM spreads it over --api-server-count
processes in front of one engine core. This replica reserves the placement group, spawns
the ranks and answers Serve's health checks for them; each HTTP replica calls `attach` once,
then submits to and polls rank 0 itself (per-client outboxes on rank 0: engine/worker.py),
so no token passes through here. Ray Serve LLM's OpenAiIngress -> LLMServer split routes
every chunk through the LLMServer replica instead; here that would put back the one event
loop the split is meant to take off the path.

If the group fails, this replica's health check fails and Serve replaces it; the HTTP
replicas' health checks (which ask the same ranks) fail too, and their replacements attach
to the new group (the only one: api_replicas needs num_replicas 1, config.py), retrying
until its `attach` answers.
"""

from __future__ import annotations

import json
import logging
import time

import ray
from ray import serve

from serve_tp.api.deployment import load_tokenizer_and_context, placement_record
from serve_tp.config import ServeTPConfig
from serve_tp.messages import GroupEndpoint
from serve_tp.metrics import record_rank_health
from serve_tp.placement import rank_bundle_index
from serve_tp.tp_group import TPGroup

logger = logging.getLogger("ray.serve")


@serve.deployment
class TPGroupDeployment:
    async def __init__(self, config: dict, device: str):
        self.config = ServeTPConfig.model_validate(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        started = time.monotonic()
        tokenizer, context_length = load_tokenizer_and_context(self.config)
        self.group = TPGroup.spawn(self.config, device, context_length,
                                   sampleable_vocab=tokenizer.get_vocab_size(with_added_tokens=True))
        ranks = await self.group.start()
        logger.info(json.dumps({
            "event": "group_started", "model": self.config.model, "replica": self.replica_id,
            "node_id": ray.get_runtime_context().get_node_id(), "device": device,
            "tensor_parallel_size": self.config.tensor_parallel_size, "api_replicas": self.config.api_replicas,
            "placement": placement_record(self.config, device),
            "ranks": [{**info, "bundle_index": rank_bundle_index(info["rank"])} for info in ranks],
            "startup_s": round(time.monotonic() - started, 1),
        }))

    async def attach(self) -> GroupEndpoint:
        """The group's rank handles for an HTTP replica; refused while the group is unhealthy,
        so a replacement HTTP replica never binds to a group that is about to be replaced."""
        await self.group.health()
        return self.group.endpoint(self.replica_id)

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica and its ranks."""
        try:
            await self.group.health()
        finally:
            record_rank_health(self.config.model_name, self.replica_id, self.group.rank_healthy)

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()
