"""scripts/gpu_dtype_record.py on CPU (its smoke test; on GPU it records fp32/fp16/bf16 for
docs/gpu.md): fp32 TP=2 over real ranks gives one process's tokens over long prompts, with
logits as close as Hugging Face's two attention kernels are to each other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_dtype_record.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_dtype_record", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fp32_tp2_equals_one_process_next_to_its_control(tiny_model_dir):
    script = _script()
    result = script.record(tiny_model_dir, ["float32"], 12, "cpu", 2)
    assert result["prompt_lengths"][0] == result["n_positions"] - 12  # ends at the context
    row = result["rows"][0]
    tp, control = row["tp_vs_one_process"], row["control_eager_vs_sdpa"]
    assert tp["equal"] == tp["of"] == 5, tp
    assert control["equal"] == 5, control
    # Rounding of another summation order only: the size of the kernels' own disagreement.
    assert 0 < tp["max_logit_diff_shared"] < 1e-3
    assert tp["max_logit_diff_shared"] <= 20 * max(control["max_logit_diff_shared"], 1e-6)
    table = script.markdown(result)
    assert "| float32 | 5/5 |" in table


def test_compare_finds_the_first_divergence_and_its_gap():
    import numpy as np

    script = _script()
    logits = np.zeros((3, 4), dtype=np.float32)
    logits[:, 1] = 2.0
    logits[1, 2] = 1.5  # step 1: top-2 gap 0.5
    other = logits.copy()
    other[1, 1] += 0.25
    result = script.compare([[1, 1, 1]], [logits], [[1, 2, 2]], [other])
    assert result["equal"] == 0 and result["first_divergence"] == [1]
    assert result["reference_top2_gap_at_divergence"] == [0.5]
    assert result["max_logit_diff_shared"] == 0.25  # steps 0 and 1 shared their inputs
