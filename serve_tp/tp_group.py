"""The replica's handle on its TP group: starts the rank actors and talks to them.

Imports no torch. Every call into a rank has a timeout, so a dead or stuck rank turns
into an error the HTTP layer can answer, never a hung request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Optional

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve_tp.config import ServeTPConfig
from serve_tp.messages import GroupEndpoint, RankSettings, SequenceOutput, SequenceRequest, pack, unpack
from serve_tp.outbox import Outbox
from serve_tp.placement import (
    rank_bundle_index, rank_resources, resolve_cpu_all_reduce, resolve_gpu_all_reduce, resolve_plan_channel,
)

logger = logging.getLogger(__name__)


POLL_TIMEOUT_S = 0.5  # an idle poll returns empty this often, so the poller notices no one waits


class RankFailure(RuntimeError):
    """A rank died, failed, or did not answer in time."""


class SequenceRefused(RuntimeError):
    """Rank 0 refused one sequence (the replica's checks should have caught it); the group serves on."""


class TPGroup:
    """A replica's handle on `tensor_parallel_size` InferenceWorker actors: spawned in its
    own placement group (`spawn`), or attached to a group another replica owns (`attach`)."""

    def __init__(self, config: ServeTPConfig, workers: list, *, client: str = "", owns_ranks: bool = True,
                 rank_info: Optional[list[dict]] = None):
        """A handle on `workers` (rank 0 first). `client` names this replica to rank 0, which
        keeps each client's outputs apart: several API replicas may share one group
        (`api_replicas`), each polling only its own sequences. Only the replica that spawned
        the ranks (`owns_ranks`) kills them at shutdown."""
        self.config = config
        self.workers = workers
        self.client = client
        self.owns_ranks = owns_ranks
        self.rank_info: list[dict] = list(rank_info or [])
        self._outboxes: dict[str, Outbox] = {}  # seq_id -> its outputs, filled by the poller
        self._poller: Optional[asyncio.Task] = None
        self._unsent: dict[str, SequenceRequest] = {}  # seq_id -> request, arrived this tick (in order)
        self._sending: set[asyncio.Task] = set()  # submission calls in flight
        self._poll_failure: Optional[str] = None
        self.rank_healthy: list[bool] = [False] * len(workers)  # as of the last health()

    @classmethod
    def spawn(cls, config: ServeTPConfig, device: str, context_length: int,
              sampleable_vocab: Optional[int] = None) -> "TPGroup":
        """Create the rank actors in the current placement group (call `start` next)."""
        from serve_tp.engine.worker import InferenceWorker

        placement_group = ray.util.get_current_placement_group()
        bundle_nodes = None
        if placement_group is not None:
            bundle_nodes = ray.util.placement_group_table(placement_group).get("bundles_to_node_id")
        settings = RankSettings(
            model=config.model,
            served_model_name=config.model_name,
            hf_revision=config.hf_revision,
            device=device,
            dtype=config.resolved_dtype(device),
            max_batch_size=config.max_batch_size,
            context_length=context_length,
            cuda_graphs=config.cuda_graphs,
            sampler_graphs=config.sampler_graphs,
            batch_wait_timeout_s=config.batch_wait_timeout_s,
            max_prefill_tokens=config.max_prefill_tokens,
            async_scheduling=config.resolved_async_scheduling(device),
            prefill_share_tokens=config.prefill_share_tokens,
            collective_timeout_s=config.startup_timeout_s,
            stall_timeout_s=config.stall_timeout_s,
            max_logprobs=config.max_logprobs,
            sampleable_vocab=sampleable_vocab,
            cpu_all_reduce=resolve_cpu_all_reduce(config, device, bundle_nodes),
            plan_channel=resolve_plan_channel(config, device, bundle_nodes),
            gpu_all_reduce=resolve_gpu_all_reduce(config, device, bundle_nodes),
            compile_decode=config.compile_decode and device == "cuda",
            decode_attention=config.decode_attention,  # "triton" on cpu was refused at build time
            fused_decode=config.fused_decode,  # refused on cpu at build time, as triton attention is
        )
        resources = rank_resources(config, device)
        worker_cls = ray.remote(InferenceWorker)
        workers = []
        for rank in range(config.tensor_parallel_size):
            strategy = None
            if placement_group is not None:
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group,
                    placement_group_bundle_index=rank_bundle_index(rank),
                )
            workers.append(
                worker_cls.options(
                    name=None,
                    num_cpus=resources["CPU"],
                    num_gpus=resources.get("GPU", 0),
                    scheduling_strategy=strategy,
                    max_restarts=0,  # a lost rank breaks the group: Serve replaces the replica
                ).remote(rank, config.tensor_parallel_size, settings)
            )
        return cls(config, workers)

    @classmethod
    def attach(cls, config: ServeTPConfig, endpoint: GroupEndpoint, client: str) -> "TPGroup":
        """A started group that another replica owns (TPGroupDeployment), as API replica `client`."""
        return cls(config, list(endpoint.workers), client=client, owns_ranks=False, rank_info=endpoint.rank_info)

    def endpoint(self, owner: str) -> GroupEndpoint:
        """What an API replica needs to attach to this (started) group."""
        return GroupEndpoint(workers=tuple(self.workers), rank_info=tuple(self.rank_info), owner=owner)

    async def start(self) -> list[dict]:
        """Rank 0 picks an address on its node; all ranks join and load their shards."""
        timeout = self.config.startup_timeout_s
        try:
            address, port = await asyncio.wait_for(self.workers[0].address.remote(), timeout)
            group_gpus = await asyncio.wait_for(self._group_gpus(), timeout)
            self.rank_info = await asyncio.wait_for(
                asyncio.gather(*[w.setup.remote(address, port, group_gpus) for w in self.workers]), timeout
            )
        except asyncio.TimeoutError as exc:
            raise RankFailure(f"TP group did not start within startup_timeout_s={timeout}") from exc
        return self.rank_info

    async def _group_gpus(self) -> Optional[list[str]]:
        """Every rank's GPU in rank order, when each has one of its own (None otherwise): the
        ranks make them all visible when their decode all-reduce reads peers' memory (never over
        NCCL, the default: no round trip then)."""
        if len(self.workers) < 2 or self.config.gpu_all_reduce == "nccl":
            return None
        ids = await asyncio.gather(*[w.gpu_id.remote() for w in self.workers])
        return list(ids) if all(ids) and len(set(ids)) == len(ids) else None

    async def generate(self, request: SequenceRequest) -> AsyncIterator[SequenceOutput]:
        """One sequence's outputs from rank 0, until one carries a finish reason."""
        if self._poll_failure is not None:
            raise RankFailure(self._poll_failure)
        seq_id = request.seq_id
        outbox = Outbox(self._stream_interval_s)
        self._outboxes[seq_id] = outbox
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_loop())
        self._queue_submission(request)
        finished = False
        try:
            while not finished:
                item = await outbox.get()
                if isinstance(item, BaseException):
                    finished = True  # refused, or rank 0 failed: nothing of it runs there
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self._outboxes.pop(seq_id, None)
            # Not sent yet (it left in the tick it came): rank 0 never hears of it.
            if self._unsent.pop(seq_id, None) is None and not finished:
                self.cancel(seq_id)

    def _queue_submission(self, request: SequenceRequest) -> None:
        """Sequences that arrive in one event-loop tick go to rank 0 in one actor call, sent
        at the tick's end: a lone request waits for nothing, and 128 users re-submitting at
        once cost the replica's one thread a Ray call per tick, not per request."""
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send_submissions)
        self._unsent[request.seq_id] = request

    def _send_submissions(self) -> None:
        if self._unsent:
            batch, self._unsent = self._unsent, {}
            task = asyncio.create_task(self._submit(batch))
            self._sending.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._sending.discard)

    async def _submit(self, batch: dict[str, SequenceRequest]) -> None:
        """One call to rank 0 for `batch` (in arrival order); a refusal or a failure reaches
        the outbox of each sequence it concerns, so one bad sequence fails only itself."""
        try:
            refused = unpack(await self.workers[0].submit.remote(pack(list(batch.values())), self.client))
            failures = {seq_id: SequenceRefused(reason) for seq_id, reason in refused.items()}
        except ray.exceptions.RayError as exc:
            reason = f"rank 0 failed: {type(exc).__name__}"
            failures = {seq_id: RankFailure(reason) for seq_id in batch}
        for seq_id, failure in failures.items():
            outbox = self._outboxes.get(seq_id)
            if outbox is not None:
                outbox.put(failure)

    async def _poll_loop(self) -> None:
        """The replica's one reader of rank 0's outputs, fanned out to the waiting sequences."""
        while self._outboxes:
            try:
                outputs = unpack(await self.workers[0].poll.remote(POLL_TIMEOUT_S, self.client))
            except ray.exceptions.RayError as exc:
                self._poll_failure = f"rank 0 failed: {type(exc).__name__}"
                for outbox in self._outboxes.values():
                    outbox.put(RankFailure(self._poll_failure))
                return
            for seq_id, item in outputs.items():
                outbox = self._outboxes.get(seq_id)
                if outbox is not None:
                    outbox.put(item)

    def _stream_interval_s(self) -> float:
        """Least time between two outputs of one sequence: stream batching (serve_tp/outbox.py),
        only while at least stream_batching_min_streams sequences are in flight here."""
        if len(self._outboxes) < self.config.stream_batching_min_streams:
            return 0.0
        return self.config.stream_batching_interval_ms / 1000

    def cancel(self, seq_id: str) -> None:
        """Fire-and-forget: free the sequence's batch slot if it is still running."""
        try:
            self.workers[0].cancel.remote(seq_id)
        except Exception:  # rank 0 gone: nothing to free
            pass

    async def health(self) -> list[dict]:
        """Every rank's health, within the health-check timeout; raises if one is bad.

        Each rank is asked on its own so `rank_healthy` can say which one failed.
        """
        timeout = self.config.health_check_timeout_s / 2
        results = await asyncio.gather(
            *[asyncio.wait_for(w.health.remote(), timeout) for w in self.workers], return_exceptions=True
        )
        self.rank_healthy = [isinstance(r, dict) and bool(r["healthy"]) for r in results]
        for rank, result in enumerate(results):
            if isinstance(result, asyncio.TimeoutError):
                raise RankFailure(f"rank {rank} did not answer its health check within {timeout:.0f}s")
            if isinstance(result, ray.exceptions.RayError):
                raise RankFailure(f"rank {rank} is gone: {type(result).__name__}") from result
            if isinstance(result, BaseException):
                raise result
        bad = [r for r in results if not r["healthy"]]
        if bad:
            raise RankFailure("; ".join(f"rank {r['rank']}: {r['reason']}" for r in bad))
        return results

    def shutdown(self) -> None:
        if not self.owns_ranks:  # the group's owner kills them; this API replica only leaves
            return
        for worker in self.workers:
            try:
                ray.kill(worker)
            except Exception:
                pass
