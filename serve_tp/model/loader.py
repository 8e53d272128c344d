"""Load one rank's shard of GPT-2: read the checkpoint, cut the shard, cast and place it.

DeepSpeed 0.19.8 cannot shard GPT-2 itself (AutoTP refuses it; its injection-policy path
splits Conv1D along the wrong dimension and ignores the fused Q|K|V layout), so the split
is ours (sharding.py, shard.py) and DeepSpeed is given the shard as a model of tp_size 1.

What `deepspeed.init_inference` does for us, read from deepspeed/inference/engine.py
(0.19.8) and checked by tests/test_loader.py, with tp_size 1, no kernel injection and no
injection policy:
  * refuses a dtype its accelerator does not list (its CPU accelerator lists float32 and
    bfloat16 only: float16 on CPU fails here, the reason config.py refuses it early);
  * casts every weight of the shard to `dtype` (module.half() / .bfloat16() / .float());
    transformers reads GPT-2 checkpoints in float32, so this is the cast to the serving dtype;
  * moves the shard to its accelerator's current device (`cuda:<torch.cuda.current_device()>`,
    set by rank_setup, or `cpu`). A CPU rank on a machine whose DeepSpeed accelerator is
    CUDA asks it to keep the shard on the host (keep_module_on_host) instead.
It creates no process group, broadcasts nothing and replaces no module (those steps need
tp_size > 1 or injection), so ranks with different shard shapes never meet in a collective
here. Its engine's `.module` is the shard object itself; we never call the engine:
GPT2Forward reads the shard's tensors. Cost measured on CPU: 0.1-0.2 s for the 82 M
parameters of a GPT-2-small shard at TP 2.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from serve_tp.model.shard import GPT2Shard, shard_gpt2
from serve_tp.model.source import check_model_shardable, read_model_config

logger = logging.getLogger(__name__)


def place_shard(shard: GPT2Shard, dtype: torch.dtype, device: torch.device) -> GPT2Shard:
    """Cast and place the shard with deepspeed.init_inference; verify where it landed."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_host = device.type == "cpu" and get_accelerator().device_name() != "cpu"
    engine = deepspeed.init_inference(
        shard, dtype=dtype, replace_with_kernel_inject=False, tensor_parallel={"tp_size": 1},
        keep_module_on_host=on_host,
    )
    shard = engine.module
    wrong = {(name, str(t.device), t.dtype) for name, t in shard.named_parameters()
             if t.dtype != dtype or t.device.type != device.type
             or (device.index is not None and t.device.index != device.index)}
    if wrong:  # DeepSpeed's accelerator disagrees with the device we were given
        raise RuntimeError(f"deepspeed.init_inference left weights off {device}/{dtype}: {sorted(wrong)[:3]}")
    return shard


def load_shard(model_dir: str, dtype_name: str, device: torch.device, rank: int, world_size: int) -> GPT2Shard:
    """This rank's shard of the GPT-2 in `model_dir`, in `dtype_name`, on `device`.

    The whole checkpoint is read on the host, the shard cut from it, and only the shard
    goes to the device.
    """
    from transformers import GPT2LMHeadModel

    started = time.monotonic()
    check_model_shardable(read_model_config(Path(model_dir)), world_size)  # before reading weights
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    shard = shard_gpt2(model, world_size, rank)  # runs source.check_model_shardable
    del model
    shard = place_shard(shard, getattr(torch, dtype_name), device)
    logger.info("rank %d/%d: %d of %d heads, %s on %s, loaded in %.1fs", rank, world_size, shard.plan.heads,
                shard.plan.num_heads, dtype_name, device, time.monotonic() - started)
    return shard
