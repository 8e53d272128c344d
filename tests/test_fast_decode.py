"""The decode step's fast paths on CPU: which all-reduce a rank picks, and compiled decode's tokens.

The symmetric-memory all-reduce itself needs GPUs (tests/test_gpu.py); here is the logic
that decides whether every rank takes it, which must never let ranks disagree, and the
torch.compile'd decode step (Inductor's CPU backend) against the eager one.
"""

from __future__ import annotations

import os

import pytest
import torch

from serve_tp.config import ServeTPConfig
from serve_tp.engine.fast_all_reduce import (
    MAX_BUFFER_BYTES, MULTICAST_OFF, buffer_elements, choose_decode_all_reduce, multicast_off_environment,
    setup_decode_all_reduce, sum_dtype,
)
from serve_tp.placement import resolve_gpu_all_reduce

CPU = torch.device("cpu")


def test_fp16_is_summed_in_float32_others_in_their_own_dtype():
    assert sum_dtype(torch.float16) == torch.float32
    assert sum_dtype(torch.bfloat16) == torch.bfloat16
    assert sum_dtype(torch.float32) == torch.float32


def test_buffer_holds_the_largest_decode_step_within_the_cap():
    assert buffer_elements(256, 1600, torch.float16) == 256 * 1600  # 1.6 MB of float32
    assert buffer_elements(2048, 1600, torch.float32) == MAX_BUFFER_BYTES // 4  # 13 MB: capped
    assert buffer_elements(1024, 1600, torch.bfloat16) == 1024 * 1600  # 3.3 MB of bf16 fits


def test_path_choice_before_the_vote():
    assert choose_decode_all_reduce("auto", 1, CPU) == (None, "one rank")
    assert choose_decode_all_reduce("nccl", 2, CPU) == (None, "gpu_all_reduce=nccl")
    kind, why = choose_decode_all_reduce("auto", 2, CPU)
    assert kind is None and "cpu" in why
    for insisted in ("p2p", "symm_mem"):
        with pytest.raises(RuntimeError, match=f"gpu_all_reduce={insisted}"):
            choose_decode_all_reduce(insisted, 2, CPU)


def test_p2p_buffer_slot_holds_the_largest_decode_step_in_the_models_dtype():
    """Two slots share the cap; fp16 is not staged, so a slot holds 2-byte elements."""
    from serve_tp.engine.fast_all_reduce import SLOTS

    assert buffer_elements(256, 1600, torch.float16, MAX_BUFFER_BYTES // SLOTS, torch.float16) == 256 * 1600
    assert buffer_elements(4096, 1600, torch.float16, MAX_BUFFER_BYTES // SLOTS, torch.float16) == \
        MAX_BUFFER_BYTES // SLOTS // 2


def test_setup_without_a_group_when_nothing_to_vote_on():
    """One rank, or nccl asked: no collective is entered (control=None would fail if it were)."""
    assert setup_decode_all_reduce("auto", 0, 1, CPU, torch.float16, 8, 64, None) == (None, "none (one rank)")
    reduce, why = setup_decode_all_reduce("nccl", 1, 2, CPU, torch.float16, 8, 64, None)
    assert reduce is None and why.startswith("nccl")


def test_multicast_stays_off_whatever_was_inherited(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    multicast_off_environment()
    assert {k: os.environ[k] for k in MULTICAST_OFF} == MULTICAST_OFF


@pytest.mark.parametrize("setting,nodes,device,expected", [
    ("auto", {1: "a", 2: "a"}, "cuda", "auto"),
    ("auto", {1: "a", 2: "b"}, "cuda", "nccl"),
    ("symm_mem", {1: "a", 2: "a"}, "cuda", "symm_mem"),
    ("p2p", {1: "a", 2: "a"}, "cuda", "p2p"),
    ("nccl", {1: "a", 2: "a"}, "cuda", "nccl"),
    ("auto", {1: "a", 2: "a"}, "cpu", "nccl"),
])
def test_replica_resolves_the_setting_from_placement(setting, nodes, device, expected):
    config = ServeTPConfig(model="gpt2", tensor_parallel_size=2, gpu_all_reduce=setting)
    assert resolve_gpu_all_reduce(config, device, nodes) == expected


@pytest.mark.parametrize("setting", ["symm_mem", "p2p"])
def test_peer_memory_across_nodes_is_refused_at_build(setting):
    config = ServeTPConfig(model="gpt2", tensor_parallel_size=2, gpu_all_reduce=setting)
    with pytest.raises(ValueError, match="one node"):
        resolve_gpu_all_reduce(config, "cuda", {1: "a", 2: "b"})


def _greedy(forward, steps=8):
    from serve_tp.engine.batch import SequenceBatch

    batch = SequenceBatch(forward, 4, 64, cuda_graphs=False)
    logits, _ = batch.admit(["a", "b", "c", "d"], [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13]])
    tokens, every = [logits.argmax(-1).tolist()], []
    for _ in range(steps):  # batch 4 then 1..3 as rows leave: both compiled graphs (batch 1, dynamic)
        logits = batch.decode(tokens[-1])
        every.append(logits)
        tokens.append(logits.argmax(-1).tolist())
    batch.evict(["a", "b", "c"])
    logits = batch.decode([tokens[-1][3]])
    return tokens + [logits.argmax(-1).tolist()], torch.cat(every + [logits])


def test_compiled_decode_gives_eager_tokens(tiny_model_dir):
    """Inductor's fused layer norms and adds against the eager step; control: the eager
    step in float64, what fp32 rounding alone moves the logits by."""
    from serve_tp.model.forward import GPT2Forward
    from serve_tp.model.loader import load_shard

    shard = load_shard(tiny_model_dir, "float32", CPU, 0, 1)
    eager_tokens, eager = _greedy(GPT2Forward(shard))
    compiled_forward = GPT2Forward(shard, compile_decode=True)
    assert compiled_forward.compiled is not None
    tokens, compiled = _greedy(compiled_forward)
    exact_tokens, exact = _greedy(GPT2Forward(shard.double()))
    control = (eager.double() - exact).abs().max().item()
    assert tokens == eager_tokens == exact_tokens
    assert (compiled.double() - eager.double()).abs().max().item() <= 10 * control + 1e-6, control


def test_decode_attention_choice_is_checked_where_the_forward_is_built(tiny_model_dir):
    """An unknown choice, and the Triton kernel on a CPU tensor outside Triton's interpreter
    (or without triton installed), fail when GPT2Forward is built, not at the first step."""
    from serve_tp.model import decode_attention
    from serve_tp.model.forward import GPT2Forward
    from serve_tp.model.loader import load_shard

    shard = load_shard(tiny_model_dir, "float32", CPU, 0, 1)
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        GPT2Forward(shard, decode_attention="flash")
    if decode_attention.interpreting():
        pytest.skip("Triton's interpreter is on in this process (tests/test_decode_attention.py): CPU is allowed")
    with pytest.raises(ValueError, match="decode_attention='triton'"):
        GPT2Forward(shard, decode_attention="triton")


def test_a_rank_sees_its_groups_gpus_and_takes_its_own_by_index(monkeypatch):
    """Ray shows a rank actor one GPU; peer memory needs the peers' GPUs visible too."""
    from serve_tp.engine.rank_setup import see_group_gpus

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a GPU session's pytest may have CUDA up
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert see_group_gpus(["3", "5"]) == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(RuntimeError, match="not among"):
        see_group_gpus(["3", "5"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"  # a refusal changes nothing


@pytest.mark.parametrize("device,world,setting,wanted", [
    ("cuda", 2, "auto", True), ("cuda", 2, "p2p", True), ("cuda", 2, "nccl", False),
    ("cuda", 1, "auto", False), ("cpu", 2, "auto", False),
])
def test_only_a_peer_memory_all_reduce_widens_the_visible_gpus(device, world, setting, wanted):
    from serve_tp.engine.rank_setup import peer_memory_wanted
    from serve_tp.messages import RankSettings

    settings = RankSettings(model="m", served_model_name="m", device=device, dtype="float16", max_batch_size=1,
                            context_length=8, gpu_all_reduce=setting)
    assert peer_memory_wanted(settings, world) is wanted


def test_a_p2p_call_on_the_slot_just_used_is_refused():
    """Consecutive p2p calls must alternate slots: the kernel has no closing barrier."""
    from serve_tp.engine.p2p_all_reduce import P2PAllReduce

    reduce = P2PAllReduce.__new__(P2PAllReduce)  # the host-side check only: no symmetric memory
    reduce._last_slot = 0
    with pytest.raises(RuntimeError, match="twice in a row"):
        reduce(torch.zeros(1, 4), slot=0)
