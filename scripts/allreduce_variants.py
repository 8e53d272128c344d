"""One rank's side of scripts/allreduce_bench.py: set up each all-reduce variant, check it, time it.

Every variant is `setup(dtype, rows, width) -> (buffer, op)`: `op()` all-reduces what the
rank wrote into `buffer` and returns the result (the buffer itself when in place). Each
(variant, mode, shape) is tried on its own and a failure becomes a record with `error`;
after a failure the same variant skips that dtype's other shapes (a refused dtype, or a
capture that failed, would only fail again).
"""

import os
import time

import torch
import torch.distributed as dist

DTYPES = ("float16", "bfloat16", "float32")
MODES = ("eager", "graph")


def variant_name(group: str, kind: str, mode: str) -> str:
    """`nccl_ll_ring_ch1:graph` for NCCL under a group's settings, `one_shot:eager` for the others."""
    return f"{group if kind == 'nccl' else kind}:{mode}"


def make_inputs(rank: int, dtype_name: str, rows: int, width: int, device):
    """(mine, the peer's): seeded per rank and shape, so every GPU makes the same numbers."""
    def one(r):
        gen = torch.Generator(device=device)
        gen.manual_seed(1_000_003 * r + 10_007 * rows + 7 * width + DTYPES.index(dtype_name))
        return torch.randn(rows, width, generator=gen, device=device).to(getattr(torch, dtype_name))

    return one(rank), one(1 - rank)


class Nccl:
    def __init__(self, device):
        self.device = device

    def setup(self, dtype, rows, width):
        buf = torch.empty(rows, width, dtype=dtype, device=self.device)

        def op():
            dist.all_reduce(buf)
            return buf

        return buf, op


class SymmMem:
    """torch's symmetric-memory all-reduces: peers' buffers mapped, read over NVLink (no multimem)."""

    def __init__(self, device, kind, max_numel):
        import torch.distributed._symmetric_memory as symm_mem

        try:
            symm_mem.set_backend("CUDA")  # not NVSHMEM; multicast is off by the environment
        except Exception:
            pass
        self.symm_mem, self.device, self.kind, self.max_numel = symm_mem, device, kind, max_numel
        self.group_name = dist.group.WORLD.group_name
        self.buffers = {}

    def setup(self, dtype, rows, width):
        if dtype not in self.buffers:  # one symmetric buffer per dtype; rendezvous is collective
            buf = self.symm_mem.empty(self.max_numel, dtype=dtype, device=self.device)
            self.symm_mem.rendezvous(buf, dist.group.WORLD)
            self.buffers[dtype] = buf
        buf = self.buffers[dtype][: rows * width].view(rows, width)
        ops = torch.ops.symm_mem
        if self.kind == "one_shot":
            return buf, lambda: ops.one_shot_all_reduce(buf, "sum", self.group_name)

        def two_shot():
            ops.two_shot_all_reduce_(buf, "sum", self.group_name)
            return buf

        return buf, two_shot


class PeerBuffers:
    """Each rank's buffers, shared with the other by CUDA IPC (torch.multiprocessing queues)."""

    def __init__(self, rank, device, max_numel, inbox, outbox):
        peer_device = torch.device("cuda", 1 - rank)
        if not torch.cuda.can_device_access_peer(device.index, peer_device.index):
            raise RuntimeError(f"GPU {device.index} cannot access GPU {peer_device.index} as a peer")
        self.mine = {d: torch.zeros(max_numel, dtype=getattr(torch, d), device=device) for d in DTYPES}
        outbox.put(self.mine)  # kept alive here: the peer maps this memory until the end
        self.peer = inbox.get(timeout=120)
        # A cross-device copy makes torch enable peer access from this GPU to the peer's,
        # which a kernel reading the peer's memory in place (Triton) needs.
        torch.empty(1, device=device).copy_(self.peer["float32"][:1])
        torch.cuda.synchronize()


_triton_add = None


def triton_add():
    """out = a + b elementwise, `b` possibly on the peer GPU (read over NVLink in place)."""
    global _triton_add
    if _triton_add is None:
        import triton
        import triton.language as tl

        @triton.jit
        def add_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(out_ptr + offs, tl.load(a_ptr + offs, mask=mask) + tl.load(b_ptr + offs, mask=mask), mask=mask)

        def launch(a, b, out):
            add_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, out, a.numel(), BLOCK=1024)
            return out

        _triton_add = launch
    return _triton_add


class P2P:
    """Lower bound of a custom all-reduce: read the peer's buffer and add; no flag orders the ranks."""

    def __init__(self, device, kind, peers: PeerBuffers):
        self.device, self.kind, self.peers = device, kind, peers
        self.add = triton_add() if kind == "p2p_triton" else None

    def setup(self, dtype, rows, width):
        name = str(dtype).removeprefix("torch.")
        buf = self.peers.mine[name][: rows * width].view(rows, width)
        peer = self.peers.peer[name][: rows * width].view(rows, width)
        if self.kind == "p2p_copy_add":
            return buf, lambda: torch.add(buf, peer.to(self.device, non_blocking=True))
        out = torch.empty_like(buf)
        return buf, lambda: self.add(buf, peer, out)


class ServeTpP2P:
    """serve_tp's own p2p all-reduce (serve_tp/engine/p2p_all_reduce.py): one Triton kernel that
    publishes, flags, reads the peer over NVLink and sums in the dtype. Calls alternate slots,
    as the decode step's attention and MLP sums do."""

    def __init__(self, rank, device, max_numel, in_place=False):
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from serve_tp.engine.p2p_all_reduce import P2PAllReduce

        self.make = lambda dtype: P2PAllReduce(dist.group.WORLD, rank, 2, device, dtype, max_numel)
        self.device, self.reducers, self.calls, self.in_place = device, {}, 0, in_place

    def setup(self, dtype, rows, width):
        if dtype not in self.reducers:  # one symmetric buffer per dtype; rendezvous is collective
            self.reducers[dtype] = self.make(dtype)
        reduce = self.reducers[dtype]
        if self.in_place:  # the input already in slot 0, as the decode step's GEMM leaves it
            # (nothing rewrites it between calls here, so one slot is safe back to back)
            buf = reduce.target(rows, width, 0)

            def in_place():
                reduce._last_slot = None  # lift the alternation rule: nothing rewrites the slot here
                return reduce(buf, slot=0)

            return buf, in_place
        buf = torch.empty(rows, width, dtype=dtype, device=self.device)

        def op():
            self.calls += 1
            return reduce(buf, slot=self.calls % 2)

        return buf, op


ON_GPU = True  # False only in the CPU run (gloo) that checks the harness itself


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _barrier(rank):
    _sync()
    dist.barrier(device_ids=[rank]) if ON_GPU else dist.barrier()
    _sync()


class _Clock:
    """CUDA events on the GPU (the GPU's own time), the host's clock in the CPU run."""

    def __init__(self):
        self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if ON_GPU else None

    def start(self):
        self.events[0].record() if self.events else setattr(self, "t0", time.perf_counter())

    def stop_us(self) -> float:
        if not self.events:
            return (time.perf_counter() - self.t0) * 1e6
        self.events[1].record()
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) * 1000


def _warm(op, times=3):
    if not ON_GPU:
        for _ in range(times):
            op()
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # graphs capture on a side stream: warm up on one too
        for _ in range(times):
            op()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def check_and_time(rank, mode, buf, op, mine, ref, timing):
    """(exact, max |result - ref|, microseconds per op) of one variant on one shape."""
    _warm(op)
    graph = None
    # thread_local: NCCL's watchdog thread may query events while we capture (as the engine does)
    if mode == "graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            result = op()
    buf.copy_(mine)
    _barrier(rank)  # both ranks' inputs are in place before anyone reads them
    if graph is None:
        result = op()
    else:
        graph.replay()
    _sync()
    exact = torch.equal(result, ref)
    diff = float((result.double() - ref.double()).abs().max())
    _barrier(rank)  # nobody overwrites a buffer the peer may still be reading
    clock = _Clock()
    if graph is None:
        clock.start()
        for _ in range(timing["iters"]):
            op()
        n = timing["iters"]
    else:
        many = torch.cuda.CUDAGraph()
        with torch.cuda.graph(many, capture_error_mode="thread_local"):
            for _ in range(timing["graph_ops"]):
                op()
        _barrier(rank)
        clock.start()
        for _ in range(timing["graph_replays"]):
            many.replay()
        n = timing["graph_ops"] * timing["graph_replays"]
    us = clock.stop_us() / n
    _barrier(rank)
    return exact, diff, us


def run_group(rank, port, group, kinds, shapes, timing, inbox, outbox, device_type="cuda"):
    """Yield one record per (kind, mode, shape), in the same order on both ranks.

    device_type "cpu" runs the `nccl` kind over gloo (every other variant then fails and
    is recorded so): a check of this harness on machines without GPUs, not a measurement.
    """
    global ON_GPU
    ON_GPU = device_type == "cuda"
    if ON_GPU:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    max_numel = max(n * w for _, n, w in shapes)
    peers = None
    failed = {}
    try:
        for kind in kinds:
            t = time.monotonic()
            try:
                if kind == "nccl":
                    variant = Nccl(device)
                elif kind in ("one_shot", "two_shot"):
                    variant = SymmMem(device, kind, max_numel)
                elif kind in ("serve_tp_p2p", "serve_tp_p2p_in_place"):
                    variant = ServeTpP2P(rank, device, max_numel, in_place=kind.endswith("in_place"))
                else:
                    peers = peers or PeerBuffers(rank, device, max_numel, inbox, outbox)
                    variant = P2P(device, kind, peers)
                setup_error = None
            except Exception as exc:
                setup_error = f"setup: {type(exc).__name__}: {exc}"
            for mode in MODES:
                name = variant_name(group, kind, mode)
                for dtype_name, rows, width in shapes:
                    rec = {"variant": name, "group": group, "kind": kind, "mode": mode, "dtype": dtype_name,
                           "rows": rows, "width": width, "us": None, "exact": False, "max_abs_diff": None,
                           "backend": dist.get_backend(),
                           "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}
                    dtype = getattr(torch, dtype_name)
                    mine, theirs = make_inputs(rank, dtype_name, rows, width, device)
                    ref = mine + theirs  # one rounding: what a correct two-rank all-reduce gives
                    rec["bytes"] = mine.numel() * mine.element_size()
                    rec["control"] = float((ref.double() - (mine.double() + theirs.double())).abs().max())
                    skip = setup_error or failed.get((name, dtype_name))
                    if skip:
                        rec["error"] = skip if setup_error else f"skipped after: {skip}"
                    else:
                        try:
                            buf, op = variant.setup(dtype, rows, width)
                            rec["exact"], rec["max_abs_diff"], rec["us"] = check_and_time(
                                rank, mode, buf, op, mine, ref, timing)
                        except Exception as exc:
                            first_line = (str(exc).strip().splitlines() or [""])[0]
                            rec["error"] = f"{type(exc).__name__}: {first_line[:300]}"
                            failed[(name, dtype_name)] = rec["error"]
                    yield rec
            print(f"[rank {rank}] {group}/{kind}: {time.monotonic() - t:.1f}s", flush=True)
    finally:
        try:
            _barrier(rank)  # the peer may still map this rank's IPC buffers
            dist.destroy_process_group()
        except Exception:
            pass
