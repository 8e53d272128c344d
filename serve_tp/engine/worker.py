"""InferenceWorker: one tensor-parallel rank, a Ray actor bound to one GPU or CPU slot.

Torch and DeepSpeed are imported here, where ranks run, never in the HTTP replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from functools import partial
from typing import Optional

from serve_tp.messages import RankSettings, SequenceOutput, SequenceRequest, pack, unpack

logger = logging.getLogger(__name__)


# A client with sequences running that has not polled for this long is gone: a live one
# polls at least every 0.5 s (tp_group.POLL_TIMEOUT_S) while it has any in flight.
ABANDONED_AFTER_S = 30.0
# A client whose sequences the sweep cancelled keeps its box this long, so a client that was
# only slow still reads their 'cancelled' ends.
SWEPT_KEPT_S = 60.0
# A gap this long between any two submit/poll calls means the actor's event loop may have
# stalled, every client's calls queued behind it: no one is judged for this long after it.
LOOP_STALL_S = 5.0


class ClientOutbox:
    """One client's outputs on rank 0, filled by the engine thread, drained by its `poll`."""

    def __init__(self, client: str):
        self.client = client
        self.outputs: dict[str, list[SequenceOutput]] = {}  # seq_id -> outputs not yet polled
        self.running: set[str] = set()  # its sequences submitted and not finished (the engine's view)
        self.signalled = False  # `ready` was set since the last drain (the engine thread sets it once)
        self.ready = asyncio.Event()
        self.polled_at = time.monotonic()  # its last poll or submit
        self.swept_at: Optional[float] = None  # when the sweep cancelled its running sequences


class InferenceWorker:
    """Loads its shard, joins the group, and runs the engine loop on a thread."""

    def __init__(self, rank: int, world_size: int, settings: RankSettings):
        self.rank = rank
        self.world_size = world_size
        self.settings = settings
        self.engine = None
        self.info: dict = {}
        # rank 0: each client's outputs not yet polled, seq_id -> outputs. A client is the
        # replica that submitted the sequence ("" for the one that owns the group; each API
        # replica under api_replicas): each polls its own, so none pays for another's tokens.
        self._outboxes: dict[str, ClientOutbox] = {}
        self._outbox_lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._last_call_at: Optional[float] = None  # the last submit/poll of any client (rank 0)
        self._judge_after = 0.0  # no sweep before this (after a gap that may have been a stall)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self._own_gpu = visible if visible and "," not in visible else None  # Ray's one GPU for this rank
        self.submit_calls = 0  # rank 0: `submit` calls, and the sequences they carried (batching's
        self.submitted = 0  # effect, seen in /health: sequences_submitted / submit_calls a call)

    def address(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a free port on it, for the others to dial."""
        import ray

        from serve_tp.engine.distributed import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def gpu_id(self) -> Optional[str]:
        """The one GPU Ray made visible to this actor (None: none, or not one), as it was
        before `setup` may have widened CUDA_VISIBLE_DEVICES to the group's."""
        return self._own_gpu

    def setup(self, address: str, port: int, group_gpus: Optional[list[str]] = None) -> dict:
        """Join the process group, load and shard the model, start the engine loop.

        `group_gpus` (every rank's `gpu_id`, in rank order): when the decode all-reduce may
        read peers' memory, this rank sees them all and takes its own by index."""
        import ray

        from serve_tp.engine.rank_setup import build_engine, peer_memory_wanted, see_group_gpus, setup_rank
        from serve_tp.metrics import EngineMetrics

        s = self.settings
        cuda_index = 0
        if group_gpus and peer_memory_wanted(s, self.world_size):
            cuda_index = see_group_gpus(group_gpus)
        ready = setup_rank(self.rank, self.world_size, address, port, s, cuda_index=cuda_index)
        on_step = EngineMetrics(s.served_model_name).step if self.rank == 0 else None
        self.engine = build_engine(ready, s, on_step)
        self.engine.start()
        self.info = {
            **ready.info(),
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu": self._own_gpu,  # this rank's GPU (the visible ones may be the group's)
            "async_scheduling": s.async_scheduling,
        }
        return self.info

    async def submit(self, packed: bytes, client: str = "") -> bytes:
        """Rank 0: queue sequences (a packed list of SequenceRequests, in arrival order: the
        replica sends all that arrived in one event-loop tick in one call) under one lock.
        Returns, packed, seq_id -> why for each sequence refused; the others' outputs come
        back through `client`'s `poll`. One refusal fails only its own sequence; a failed
        engine raises, failing them all, as the group is down."""
        requests: list[SequenceRequest] = unpack(packed)
        self.submit_calls += 1
        self.submitted += len(requests)
        box = self._outbox_of(client)
        box.polled_at = self._called()
        seq_ids = [request.seq_id for request in requests]
        with self._outbox_lock:
            box.running.update(seq_ids)
        arrivals = [(request, partial(self._post, box, request.seq_id)) for request in requests]
        try:
            # A failed engine raises here, failing the whole call: the group is down (503 for all).
            refused = self.engine.submit_many(arrivals)
        except BaseException:
            with self._outbox_lock:
                box.running.difference_update(seq_ids)
            raise
        with self._outbox_lock:
            box.running.difference_update(refused)
        return pack(refused)

    def _called(self) -> float:
        """Now; after a gap in submit/poll calls long enough to have been a stalled loop, the
        sweep waits LOOP_STALL_S more, so the calls queued behind the stall run first."""
        now = time.monotonic()
        if self._last_call_at is not None and now - self._last_call_at > LOOP_STALL_S:
            self._judge_after = now + LOOP_STALL_S
        self._last_call_at = now
        return now

    def _outbox_of(self, client: str) -> "ClientOutbox":
        """`client`'s outbox, made on its first call (on the actor's event loop)."""
        box = self._outboxes.get(client)
        if box is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            box = self._outboxes[client] = ClientOutbox(client)
        return box

    def _post(self, box: "ClientOutbox", seq_id: str, out: SequenceOutput) -> None:
        """Engine thread: file a sequence's output; wake its client's `poll` once per burst,
        not per token."""
        with self._outbox_lock:
            box.outputs.setdefault(seq_id, []).append(out)
            if out.finish_reason is not None:
                box.running.discard(seq_id)
            if box.signalled:
                return
            box.signalled = True
        self._loop.call_soon_threadsafe(box.ready.set)

    async def poll(self, timeout_s: float, client: str = "") -> bytes:
        """Rank 0: every new output of `client`'s sequences since its last poll, waiting up
        to `timeout_s`, as a packed dict seq_id -> SequenceOutput (serve_tp.messages.pack).

        One call carries the whole batch's step (or several steps), so streaming costs one
        Ray round trip per step instead of one per token per sequence.
        """
        box = self._outbox_of(client)
        now = box.polled_at = self._called()
        box.swept_at = None  # it polls: alive
        if now >= self._judge_after:
            self._drop_abandoned(now)
        try:
            await asyncio.wait_for(box.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            return pack({})
        box.polled_at = time.monotonic()
        with self._outbox_lock:
            taken, box.outputs, box.signalled = box.outputs, {}, False
            box.ready.clear()
        merged = {}
        for seq_id, outs in taken.items():
            out = outs[0]
            for later in outs[1:]:
                out = out.merge(later)
            merged[seq_id] = out
        return pack(merged)

    def _drop_abandoned(self, now: float) -> None:
        """Cancel the running sequences of a client that has stopped polling (its HTTP replica
        died or was replaced): they would decode to max_tokens for no one. Its box stays for
        SWEPT_KEPT_S, so a client that was only slow still reads their 'cancelled' ends (its
        requests fail, not hang). A box with nothing running, idle as long, is dropped without
        a word: its client has left, or gets a new box with its next submit. (Run from polls:
        a dead client's sequences wait for another client's traffic to be cancelled.)"""
        for client, box in list(self._outboxes.items()):
            idle = now - box.polled_at
            if idle <= ABANDONED_AFTER_S:
                continue
            with self._outbox_lock:
                running = sorted(box.running)
            if not running:
                if box.swept_at is None or now - box.swept_at > SWEPT_KEPT_S:
                    del self._outboxes[client]
                continue
            if box.swept_at is not None:
                continue  # cancelled already: their ends are on the way
            box.swept_at = now
            logger.warning("client %r has not polled for %.0f s: cancelling its %d running sequences",
                           client, idle, len(running))
            for seq_id in running:
                self.cancel(seq_id)

    def cancel(self, seq_id: str) -> None:
        if self.engine is not None:
            self.engine.cancel(seq_id)

    def health(self) -> dict:
        """Alive, loop running, and stepping when there is work (or heartbeats, if a follower)."""
        engine = self.engine
        if engine is None:
            return {"rank": self.rank, "healthy": False, "reason": "not set up"}
        age = time.monotonic() - engine.last_step_at
        stall = self.settings.stall_timeout_s
        reason: Optional[str] = None
        if engine.failure is not None:
            reason = f"engine failed: {engine.failure!r}"
        elif not engine.alive:
            reason = "engine loop stopped"
        elif self.rank == 0 and engine.has_work() and age > stall:
            reason = f"no step for {age:.0f}s with work queued"
        elif self.rank != 0 and age > stall:
            reason = f"no plan from rank 0 for {age:.0f}s"
        # overlapped_steps: steps whose tokens rank 0 read after sending the next plan (async scheduling)
        return {**self.info, "healthy": reason is None, "reason": reason, **engine.load(),
                "overlapped_steps": engine.overlapped_steps,
                "submit_calls": self.submit_calls, "sequences_submitted": self.submitted}

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

