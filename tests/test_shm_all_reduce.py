"""DeepSpeed's shared-memory all-reduce on real CPU ranks: its sums against gloo's, its
shared-memory names cleaned up, and a stuck peer turned into a dead rank, not a spin."""

from __future__ import annotations

import time
import traceback

import pytest
import torch
from serve_tp.engine.shm_all_reduce import SHM_TIMEOUT_EXIT_CODE, segment_path
from tests.rank_processes import collect_reports, spawn_ranks

# Elements per rank: the small-message path, the one that splits the work over ranks
# (>= 1 MiB), and one over the 32 MiB chunk that the op loops over.
SIZES = [(7,), (16, 96), (600, 768), (8_500_000,)]


def _partials(world_size: int, shape, seed: int) -> list[torch.Tensor]:
    """Every rank's input, built alike on every rank so each can check the sum itself."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 10 ** torch.randint(-3, 4, shape, generator=g) for _ in range(world_size)]


def _sums_rank(rank, world_size, port, results):
    try:
        torch.set_num_threads(1)
        from serve_tp.engine.distributed import init_tp_comm

        comm = init_tp_comm(rank, world_size, "127.0.0.1", port, "gloo", 60, cpu_all_reduce="shm")
        maps = open("/proc/self/maps").read()
        report = {"kind": comm.all_reduce_kind, "sizes": [],
                  "own_segment_exists": segment_path("127.0.0.1", port, rank).exists(),
                  "own_segment_mapped_deleted": f"{segment_path('127.0.0.1', port, rank)} (deleted)" in maps}
        for i, shape in enumerate(SIZES):
            parts = _partials(world_size, shape, seed=i)
            shm, gloo = parts[rank].clone(), parts[rank].clone()
            comm.all_reduce(shm)
            torch.distributed.all_reduce(gloo)
            exact = sum(p.double() for p in parts)
            # What rounding alone does: fp32 sums in two orders, and the bound on any order.
            forward, backward = parts[0].clone(), parts[-1].clone()
            for p in parts[1:]:
                forward += p
            for p in reversed(parts[:-1]):
                backward += p
            bound = (world_size - 1) * torch.finfo(torch.float32).eps * sum(p.double().abs() for p in parts)
            report["sizes"].append({
                "shape": shape,
                "shm_equals_gloo": bool(torch.equal(shm, gloo)),
                "shm_err_over_bound": float(((shm.double() - exact).abs() - bound).max()),
                "gloo_err_over_bound": float(((gloo.double() - exact).abs() - bound).max()),
                "orders_differ": bool(not torch.equal(forward, backward)),
                "shm_minus_gloo": float((shm - gloo).abs().max()),
                "orders_gap": float((forward - backward).abs().max()),
                "unsummed_err_over_bound": float(((parts[rank].double() - exact).abs() - bound).max()),
                "checksum": float(shm.double().sum()),
            })
        # Tensors the shm kernel cannot sum take gloo; they must still be summed.
        odd = [_partials(world_size, (5, 8), seed=99)[r].t() for r in range(world_size)]
        strided, wide = odd[rank].clone().t().t(), odd[rank].double()
        comm.all_reduce(strided)
        comm.all_reduce(wide)
        want = torch.stack(odd).sum(0)
        report["non_contiguous_summed"] = bool(torch.allclose(strided, want, atol=1e-5))
        report["float64_summed"] = bool(torch.allclose(wide, want.double(), atol=1e-5))
        results.put((rank, report, None))
    except Exception:
        results.put((rank, None, traceback.format_exc()))


@pytest.mark.parametrize("world_size", [2, 3])
def test_shm_sums_match_gloo_within_fp32_rounding(world_size):
    procs, results, port = spawn_ranks(_sums_rank, world_size)
    got = collect_reports(procs, results, world_size)
    for rank, report in got.items():
        assert report["kind"] == "shm"
        # The rank's segment was mapped under the name we unlink, and the name is gone.
        assert report["own_segment_mapped_deleted"] and not report["own_segment_exists"]
        assert report["non_contiguous_summed"] and report["float64_summed"]
        for size in report["sizes"]:
            assert size["shm_err_over_bound"] <= 0, size  # within fp32 rounding of the exact sum
            assert size["gloo_err_over_bound"] <= 0, size
            assert size["unsummed_err_over_bound"] > 0, size  # control: an unsummed tensor fails the check
            if world_size == 2:  # a + b is one rounding in any order: bit for bit
                assert size["shm_equals_gloo"], size
    if world_size == 3:  # control: with three terms the order alone moves the last bits
        assert any(size["orders_differ"] for size in got[0]["sizes"])
    for i in range(len(SIZES)):  # every rank holds the same sum, bit for bit
        assert len({got[r]["sizes"][i]["checksum"] for r in got}) == 1


def _stuck_peer_rank(rank, world_size, port, results):
    from serve_tp.engine.distributed import init_tp_comm

    comm = init_tp_comm(rank, world_size, "127.0.0.1", port, "gloo", 60, cpu_all_reduce="shm", shm_timeout_s=2)
    results.put((rank, (comm.all_reduce_kind, time.time()), None))
    if rank == 1:
        time.sleep(60)  # joined the group, never enters the collective
        return
    comm.all_reduce(torch.ones(16))  # spins in C++ until the watchdog ends this process
    results.put((rank, ("returned", time.time()), None))


def test_a_peer_that_never_arrives_ends_the_waiting_rank_within_the_timeout():
    procs, results, _ = spawn_ranks(_stuck_peer_rank, 2)
    try:
        joined = {}
        while len(joined) < 2:
            rank, joined[rank], _ = results.get(timeout=120)
        assert {rank: kind for rank, (kind, _) in joined.items()} == {0: "shm", 1: "shm"}
        procs[0].join(timeout=30)
        waited = time.time() - joined[0][1]  # from entering the all-reduce to the rank's end
        assert procs[0].exitcode == SHM_TIMEOUT_EXIT_CODE, (procs[0].exitcode, waited)
        assert results.empty()  # the all-reduce never returned (with garbage) before the end
        assert 2 <= waited < 20, waited
        assert procs[1].is_alive()  # the healthy peer is untouched; the replica replaces the group
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_the_replica_asks_for_shared_memory_only_when_every_rank_is_on_one_node():
    from pydantic import ValidationError

    from serve_tp.config import ServeTPConfig
    from serve_tp.placement import resolve_cpu_all_reduce

    auto = ServeTPConfig(tensor_parallel_size=2)
    shm = ServeTPConfig(tensor_parallel_size=2, cpu_all_reduce="shm", placement_strategy="PACK")
    one_node, two_nodes = {0: "a", 1: "a", 2: "a"}, {0: "a", 1: "a", 2: "b"}
    assert resolve_cpu_all_reduce(auto, "cpu", one_node) == "auto"
    assert resolve_cpu_all_reduce(shm, "cpu", one_node) == "shm"
    assert resolve_cpu_all_reduce(auto, "cpu", two_nodes) == "gloo"
    assert resolve_cpu_all_reduce(auto, "cpu", None) == "gloo"  # no placement group: ranks may be anywhere
    assert resolve_cpu_all_reduce(auto, "cuda", one_node) == "gloo"  # NCCL; the setting is unused
    assert resolve_cpu_all_reduce(ServeTPConfig(cpu_all_reduce="gloo"), "cpu", one_node) == "gloo"
    with pytest.raises(ValueError, match=r"the placement group put the 2 ranks on 2 node\(s\) \(PACK\)"):
        resolve_cpu_all_reduce(shm, "cpu", two_nodes)
    with pytest.raises(ValidationError, match="STRICT_SPREAD puts each rank on its own"):
        ServeTPConfig(tensor_parallel_size=2, cpu_all_reduce="shm", placement_strategy="STRICT_SPREAD")


def _health_ranks(url):
    import httpx

    r = httpx.get(f"{url}/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["ranks"]


def _greedy_text(url, prompt="Hello world."):
    import httpx

    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_the_app_sums_in_shared_memory_and_answers_as_with_gloo(serve_app):
    """The default (auto) on one node is shm; cpu_all_reduce=gloo picks gloo; same answers."""
    from ray import serve

    from tests.conftest import deploy

    assert [rank["all_reduce"] for rank in _health_ranks(serve_app.base_url)] == ["shm", "shm"]
    url = deploy("gloo_sums", "/gloo_sums", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 cpu_all_reduce="gloo", replica_cpus=0.5, cpus_per_rank=0.5)
    try:
        assert [rank["all_reduce"] for rank in _health_ranks(url)] == ["gloo", "gloo"]
        for prompt in ("Hello world.", "The quick brown fox jumps over the lazy"):
            assert _greedy_text(url, prompt) == _greedy_text(serve_app.base_url, prompt)
    finally:
        serve.delete("gloo_sums")
