"""CPU cost of the replica's own streaming path, per request and per token, without HTTP.

What the end-to-end benchmarks cannot isolate on a small shared machine: the replica's
serve_tp code between rank 0's poll results and the SSE strings StreamingResponse sends
(TPGroup's poller and Outbox, CompletionService: detokenize, stop strings, metrics,
chunk JSON), and rank 0's side of delivery (OutputProcessor.deliver, InferenceWorker's
outbox and poll, the poll result's pickling). Rank 0's actor is stood in by an object
answering `submit`/`poll` in-process: each poll gives every live sequence one token, as a
decode step does; HTTP, Ray's transport and the model are not in it.

    python -m benchmarks.bench_stream_path --users 32 --max-tokens 64 --rounds 3
    python -m benchmarks.bench_stream_path --submit 128 --rounds 3   # N submitted at once, real Ray actor

Prints CPU microseconds (process time) per request and per token for the replica part,
and per row of a step for rank 0's part. Compare variants by ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import time

import ray.cloudpickle as cloudpickle
from tokenizers import Tokenizer

from serve_tp.api.plan import RequestPlanner
from serve_tp.api.protocol import CompletionRequest
from serve_tp.api.serving import CompletionService
from serve_tp.config import ServeTPConfig
from serve_tp.engine.output import OutputProcessor
from serve_tp.engine.scheduler import Sequence
from serve_tp.engine.worker import InferenceWorker
from serve_tp.messages import SamplingParams, SequenceRequest
from serve_tp.tp_group import TPGroup


try:  # the replica and rank 0 exchange packed bytes (serve_tp.messages.pack) since this branch
    from serve_tp.messages import pack as _WIRE_PACK, unpack as _WIRE_UNPACK
except ImportError:
    _WIRE_PACK = _WIRE_UNPACK = None


def _wire(value):
    """Through Ray's transport as Ray serializes it: bytes pass as they are, the rest cloudpickled."""
    return value if isinstance(value, bytes) else pickle.loads(cloudpickle.dumps(value))


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class StandInRank0:
    """submit/poll/cancel as rank 0's actor answers them, with a token per live sequence per poll."""

    def __init__(self, vocab: int, eos: int):
        self.live: dict[str, list] = {}  # seq_id -> [produced, max_tokens]
        self.vocab, self.eos = vocab, eos
        self.submit, self.poll, self.cancel = _Remote(self._submit), _Remote(self._poll), _Remote(self._cancel)
        self.rows = 0

    async def _submit(self, request):
        request = _WIRE_UNPACK(_wire(request)) if _WIRE_PACK else _wire(request)
        for one in request if isinstance(request, list) else [request]:  # a tick's batch (issue #10)
            self.live[one.seq_id] = [0, one.params.max_tokens]
        return _WIRE_PACK({}) if isinstance(request, list) else None

    def _cancel(self, seq_id: str) -> None:
        self.live.pop(seq_id, None)

    async def _poll(self, timeout_s: float):
        from serve_tp.messages import SequenceOutput

        await asyncio.sleep(0)
        if not self.live:
            await asyncio.sleep(0.001)
        out = {}
        for seq_id, state in list(self.live.items()):
            state[0] += 1
            token = 300 + (hash(seq_id) + 7 * state[0]) % (self.vocab - 400)
            finish = "length" if state[0] >= state[1] else None
            out[seq_id] = SequenceOutput(token_ids=[token], finish_reason=finish)
            if finish:
                del self.live[seq_id]
        self.rows += len(out)
        return _wire(_WIRE_PACK(out) if _WIRE_PACK else out)  # as rank 0's poll answers in this checkout


def _service(model_dir: str, stream_interval_ms: float) -> tuple[CompletionService, StandInRank0]:
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    config = ServeTPConfig(model=model_dir, stream_batching_interval_ms=stream_interval_ms)
    group = object.__new__(TPGroup)  # its methods, with the stand-in for the rank actors
    rank0 = StandInRank0(tokenizer.get_vocab_size(), 50256)
    group.config, group.workers = config, [rank0]
    group._outboxes, group._poller, group._poll_failure = {}, None, None
    group._unsent, group._sending = {}, set()  # this branch's; unused before it
    return CompletionService(config, tokenizer, 1024, group), rank0


async def _replica(args) -> dict:
    service, rank0 = _service(args.model, args.stream_interval_ms)
    body = json.dumps({"model": service.model_name, "prompt": args.prompt, "max_tokens": args.max_tokens,
                       "stream": True, "temperature": 0, "ignore_eos": True}).encode()

    async def user():
        for _ in range(args.requests_per_user):
            req = CompletionRequest.model_validate_json(body)
            jobs = service.plan(req)
            async for _chunk in service.stream(req, jobs):
                pass

    await asyncio.gather(*[user() for _ in range(args.users)])  # warm-up
    rank0.rows = 0
    cpu0 = time.process_time()
    await asyncio.gather(*[user() for _ in range(args.users)])
    cpu = time.process_time() - cpu0
    requests = args.users * args.requests_per_user
    return {"us_per_request": 1e6 * cpu / requests, "us_per_token": 1e6 * cpu / max(rank0.rows, 1)}


async def _rank0(args) -> dict:
    """Rank 0's delivery of one step of `users` rows, then a poll that takes it, pickled."""
    worker = InferenceWorker(0, 1, None)
    box = worker._outbox_of("")  # the owning replica's outputs

    class _Finished:
        def finish(self, seq_id):
            pass

    params = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)
    rows = [Sequence(SequenceRequest(f"cmpl-{i:032x}-0", tuple(range(32)), params), None, 0)
            for i in range(args.users)]
    for seq in rows:
        seq.sink = (lambda sid: lambda out: worker._post(box, sid, out))(seq.seq_id)
    outputs = OutputProcessor(_Finished(), 50256, 10**9)
    tokens = list(range(1000, 1000 + len(rows)))
    steps = 400
    cpu0 = time.process_time()
    for _ in range(steps):
        outputs.deliver(rows, tokens)
        answer = await worker.poll(1.0)
        if not isinstance(answer, bytes):
            cloudpickle.dumps(answer)  # Ray's serialization of the answer, done here by the caller
    cpu = time.process_time() - cpu0
    return {"us_per_row": 1e6 * cpu / (steps * len(rows))}


def _ray_serialize(users: int) -> float:
    """Microseconds Ray's own serializer takes for one poll answer of `users` rows, as this
    checkout's rank 0 returns it (a dict of SequenceOutputs, or those packed to bytes)."""
    import ray

    from serve_tp.messages import SequenceOutput

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        context = ray._private.worker.global_worker.get_serialization_context()
        answer = {f"cmpl-{i:032x}-0": SequenceOutput(token_ids=[1000 + i]) for i in range(users)}
        n = 300
        cpu0 = time.process_time()
        for _ in range(n):
            context.serialize(_WIRE_PACK(answer) if _WIRE_PACK else answer)
        return 1e6 * (time.process_time() - cpu0) / n
    finally:
        ray.shutdown()


class SubmitRank0:
    """Rank 0's `submit`/`poll`/`cancel` as a real Ray actor that runs no model: `submit`
    takes one packed SequenceRequest (before issue #10's batching) or a packed list of them,
    and the next `poll` finishes every sequence submitted with one token."""

    def __init__(self):
        self._new: list[str] = []
        self._ready = None
        self.calls = 0

    async def submit(self, packed: bytes, client: str = ""):
        from serve_tp.messages import pack, unpack

        message = unpack(packed)
        self._new += [r.seq_id for r in message] if isinstance(message, list) else [message.seq_id]
        self.calls += 1
        if self._ready is not None:
            self._ready.set()
        return pack({}) if isinstance(message, list) else None

    async def poll(self, timeout_s: float, client: str = "") -> bytes:
        from serve_tp.messages import SequenceOutput, pack

        if not self._new:
            self._ready = asyncio.Event()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        done, self._new = self._new, []
        return pack({seq_id: SequenceOutput([1000], None, None, "length") for seq_id in done})

    def cancel(self, seq_id: str) -> None:
        pass

    def submit_calls(self) -> int:
        return self.calls


def _submission(args) -> dict:
    """The replica's CPU per request (all its threads: Ray's too) when `submit` requests arrive
    at once and each finishes with its first token: TPGroup.generate end to end against a real
    rank-0 actor that runs no model, so the Ray calls are real and their count is what differs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        rank0 = ray.remote(SubmitRank0).remote()
        group = object.__new__(TPGroup)
        group.config, group.workers = ServeTPConfig(model=args.model), [rank0]
        group._outboxes, group._poller, group._poll_failure = {}, None, None
        group._unsent, group._sending = {}, set()  # this branch's; unused before it
        params = SamplingParams(max_tokens=1, temperature=0)

        async def wave(n: int, tag: str):
            async def one(i):
                async for _ in group.generate(SequenceRequest(f"{tag}-{i}", tuple(range(32)), params)):
                    pass
            await asyncio.gather(*[one(i) for i in range(n)])

        async def run():
            for w in range(3):
                await wave(args.submit, f"warm{w}")
            calls0 = await rank0.submit_calls.remote()
            cpu0 = time.process_time()
            for w in range(args.waves):
                await wave(args.submit, f"w{w}")
            cpu = time.process_time() - cpu0
            calls = await rank0.submit_calls.remote() - calls0
            requests = args.waves * args.submit
            return {"us_per_request": 1e6 * cpu / requests, "requests_per_call": requests / max(calls, 1)}

        return asyncio.run(run())
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/bench-tiny-1k", help="a model directory with tokenizer.json")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--requests-per-user", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. " * 3)
    p.add_argument("--stream-interval-ms", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ray", action="store_true", help="also time Ray's serializer on one poll answer (starts Ray)")
    p.add_argument("--submit", type=int, default=0,
                   help="instead: N requests submitted at once, each done at its first token, against a "
                        "real Ray actor for rank 0 (starts Ray); replica CPU us a request")
    p.add_argument("--waves", type=int, default=20, help="with --submit: how many times N arrive at once")
    args = p.parse_args()
    if args.submit:
        for r in range(args.rounds):
            result = _submission(args)
            print(f"round {r + 1}: {args.submit} at once: replica {result['us_per_request']:.0f} us/request, "
                  f"{result['requests_per_call']:.1f} requests per submit call", flush=True)
        return
    if args.ray:
        print(f"Ray serializes a poll answer of {args.users} rows in {_ray_serialize(args.users):.0f} us", flush=True)
    for r in range(args.rounds):
        replica, rank0 = asyncio.run(_replica(args)), asyncio.run(_rank0(args))
        print(f"round {r + 1}: replica {replica['us_per_request']:.0f} us/request = "
              f"{replica['us_per_token']:.1f} us/token (all included); rank 0 delivery "
              f"{rank0['us_per_row']:.2f} us/row-step", flush=True)


if __name__ == "__main__":
    main()
