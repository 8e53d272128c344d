"""The shared-memory plan ring on real processes: every rank receives rank 0's plans, whole and
in order (plans bigger than a slot included, and a writer that laps slow readers waits), a
dead peer fails the wait at once instead of at the timeout, and the app serves over it."""

from __future__ import annotations

import multiprocessing
import random
import time
import traceback

import pytest

from serve_tp.engine.distributed import free_port
from serve_tp.engine.plan_channel import SLOT_BYTES, SLOTS, ChannelClosed, PlanRing, segment_path
from tests.rank_processes import collect_reports, spawn_ranks

PLANS = 120


def _plans(count: int) -> list:
    """Plans of every size class: empty, a decode step, and one past a slot (its tail goes over gloo)."""
    rng = random.Random(7)
    plans = []
    for i in range(count):
        if i % 40 == 17:
            plans.append({"step": i, "admit": list(range(SLOT_BYTES // 2))})  # ~0.5-1 MB pickled
        else:
            plans.append({"step": i, "decode": [rng.randrange(50257) for _ in range(rng.randrange(0, 300))]})
    return plans


def _ring_rank(rank, world_size, port, results):
    try:
        from serve_tp.engine.distributed import init_tp_comm

        comm = init_tp_comm(rank, world_size, "127.0.0.1", port, "gloo", 60, cpu_all_reduce="gloo",
                            plan_channel="shm")
        received = []
        rng = random.Random(rank)
        for plan in _plans(PLANS):
            got = comm.broadcast_plan(plan if rank == 0 else None)
            received.append(got)
            if rank == world_size - 1 and rng.random() < 0.1:
                time.sleep(0.02)  # a slow reader: rank 0 laps it and must wait for its slot
        results.put((rank, {"channel": comm.plan_channel, "plans": received,
                            "segment_left": segment_path("127.0.0.1", port).exists()}, None))
    except Exception:
        results.put((rank, None, traceback.format_exc()))


def test_every_rank_receives_every_plan_in_order():
    world_size = 3
    procs, results, _ = spawn_ranks(_ring_rank, world_size)
    got = collect_reports(procs, results, world_size, timeout=120)
    expected = _plans(PLANS)
    assert any(len(repr(p)) > SLOT_BYTES for p in expected)  # the gloo tail path is taken
    for rank in range(world_size):
        assert got[rank]["channel"] == "shm"
        assert got[rank]["plans"] == expected
        assert not got[rank]["segment_left"]  # unlinked once every rank had mapped it


def _reader_of_dead_writer(path_parts, magic, out):
    try:
        ring = PlanRing.attach(*path_parts, rank=1, world_size=2, magic=magic)
        started = time.monotonic()
        ring.receive(timeout_s=60, fetch_rest=lambda n: b"")
        out.put(("received", 0.0))
    except ChannelClosed as exc:
        out.put((str(exc), time.monotonic() - started))


def test_a_reader_whose_writer_died_fails_at_once_not_at_the_timeout():
    """The writer here is a child that maps the ring and exits: the reader sees its pid gone."""
    port = free_port("127.0.0.1")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    writer = ctx.Process(target=_hold_ring_then_exit, args=(port, out))
    writer.start()
    magic = out.get(timeout=30)
    reader = ctx.Process(target=_reader_of_dead_writer, args=(("127.0.0.1", port), magic, out))
    reader.start()
    out_message, waited = out.get(timeout=30)
    writer.join(timeout=10)
    reader.join(timeout=10)
    segment_path("127.0.0.1", port).unlink(missing_ok=True)
    assert "is gone" in out_message
    assert waited < 10  # the timeout was 60 s


def _hold_ring_then_exit(port, out):
    ring = PlanRing.create("127.0.0.1", port, world_size=2)
    out.put(ring.magic)
    time.sleep(1.0)  # the reader attaches and starts waiting; then this writer is gone


def test_a_writer_that_laps_a_stuck_reader_gives_up_at_the_stall_timeout():
    port = free_port("127.0.0.1")
    writer = PlanRing.create("127.0.0.1", port, world_size=2)
    reader = PlanRing.attach("127.0.0.1", port, 1, 2, writer.magic)  # alive (this process), never reads
    writer.unlink()
    for step in range(SLOTS):
        assert writer.send(b"plan %d" % step, timeout_s=1) == 0
    started = time.monotonic()
    with pytest.raises(ChannelClosed, match="take the plan before last"):
        writer.send(b"one too many", timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert reader.receive(1, lambda n: b"") == b"plan 0"  # the ring kept what it held
    assert writer.send(b"now it fits", timeout_s=1) == 0


def test_an_attach_to_another_groups_ring_is_refused():
    port = free_port("127.0.0.1")
    writer = PlanRing.create("127.0.0.1", port, world_size=2)
    try:
        with pytest.raises(ChannelClosed, match="another group"):
            PlanRing.attach("127.0.0.1", port, 1, 2, writer.magic + 1)
    finally:
        writer.unlink()


def test_resolve_plan_channel():
    from serve_tp.config import ServeTPConfig
    from serve_tp.placement import resolve_plan_channel

    one_node, two_nodes = {1: "a", 2: "a"}, {1: "a", 2: "b"}
    auto = ServeTPConfig(tensor_parallel_size=2)
    assert resolve_plan_channel(auto, "cuda", one_node) == "shm"
    assert resolve_plan_channel(auto, "cuda", two_nodes) == "gloo"
    assert resolve_plan_channel(auto, "cuda", None) == "gloo"  # no placement group: ranks may be anywhere
    assert resolve_plan_channel(auto, "cpu", one_node) == "gloo"  # CPU cores belong to the forward
    shm = ServeTPConfig(tensor_parallel_size=2, plan_channel="shm", placement_strategy="PACK")
    assert resolve_plan_channel(shm, "cpu", one_node) == "shm"
    with pytest.raises(ValueError, match=r"plan_channel shm needs every rank on one node"):
        resolve_plan_channel(shm, "cuda", two_nodes)
    assert resolve_plan_channel(ServeTPConfig(tensor_parallel_size=2, plan_channel="gloo"), "cuda", one_node) == "gloo"
    assert resolve_plan_channel(ServeTPConfig(tensor_parallel_size=1), "cuda", {1: "a"}) == "gloo"


def test_the_app_sends_plans_through_shared_memory_and_answers_as_over_gloo(serve_app):
    """On CPU the default is gloo; plan_channel=shm serves the same greedy text."""
    import httpx
    from ray import serve

    from tests.conftest import deploy

    def ranks(url):
        r = httpx.get(f"{url}/health", timeout=30)
        assert r.status_code == 200, r.text
        return [rank["plan_channel"] for rank in r.json()["ranks"]]

    def text(url, prompt):
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert ranks(serve_app.base_url) == ["gloo", "gloo"]
    url = deploy("shm_plans", "/shm_plans", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 plan_channel="shm", replica_cpus=0.5, cpus_per_rank=0.5)
    try:
        assert ranks(url) == ["shm", "shm"]
        for prompt in ("Hello world.", "The quick brown fox jumps over the lazy"):
            assert text(url, prompt) == text(serve_app.base_url, prompt)
    finally:
        serve.delete("shm_plans")
