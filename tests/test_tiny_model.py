"""The offline test model behaves like a trained one: well conditioned and peaked.

These are the controls for every correctness test that uses it: if Hugging Face's own
eager and SDPA attention disagreed on this model, or its greedy choices were near-ties,
agreement with it would prove nothing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_tp.model.pretrain import evaluate, split_corpus
from serve_tp.model.tiny_model import build_tiny_gpt2, corpus_ids
from tests import reference


@pytest.fixture(scope="module")
def held_out_windows(tiny_model_dir):
    """Four full-context windows of text the model never trained on."""
    context = reference.hf_model(tiny_model_dir).config.n_positions
    _, held = split_corpus(corpus_ids(reference.tokenizer(tiny_model_dir)))
    return [held[i * context: (i + 1) * context].tolist() for i in range(4)]


@pytest.fixture(scope="module")
def control(tiny_model_dir, held_out_windows):
    return reference.rounding_control(tiny_model_dir, held_out_windows)


def test_eager_and_sdpa_agree_over_the_whole_context(tiny_model_dir, held_out_windows, control):
    """Two correct attention kernels in float32, every position up to n_positions: the same
    argmax everywhere, logits apart by rounding only (float32's own error against float64
    is the yardstick)."""
    for ids in held_out_windows:
        eager = reference.logits_along(tiny_model_dir, ids, "float32", "eager")
        sdpa = reference.logits_along(tiny_model_dir, ids, "float32", "sdpa")
        assert torch.equal(eager.argmax(-1), sdpa.argmax(-1))
    # ~1e-5 on a float32 model whose logits span tens: rounding, not disagreement
    assert control["eager_vs_sdpa"] <= 2 * control["fp32_vs_fp64"] < 1e-4, control


def test_logits_are_peaked_where_an_untrained_model_is_flat(tiny_model_dir, tmp_path, control):
    """Held-out text: the trained model's top token is likely, where the same shape at its
    initialisation (std 0.02) spreads its probability thin; and its top two logits are
    typically apart by far more than rounding moves them."""
    ids = corpus_ids(reference.tokenizer(tiny_model_dir))
    trained = evaluate(reference.hf_model(tiny_model_dir, "float32", "sdpa"), ids)
    untrained_dir = build_tiny_gpt2(tmp_path / "untrained", train_steps=0)
    untrained = evaluate(reference.hf_model(str(untrained_dir), "float32", "sdpa"), ids)
    vocab = reference.hf_model(tiny_model_dir).config.vocab_size
    assert trained["loss"] < 0.6 * torch.log(torch.tensor(float(vocab))) < untrained["loss"], (trained, untrained)
    assert trained["top1_prob"] > 0.15 and trained["top1_prob"] > 20 * untrained["top1_prob"]
    assert trained["top2_gap_median"] > 1e3 * control["fp32_vs_fp64"]
    recorded = json.loads((Path(tiny_model_dir) / "training.json").read_text())
    assert recorded["held_out"]["loss"] == pytest.approx(trained["loss"], rel=1e-4)


def test_cli_builds_a_padded_vocabulary_model_for_a_given_number_of_steps(tmp_path):
    out = tmp_path / "cli-model"
    subprocess.run([sys.executable, "-m", "serve_tp.model.tiny_model", str(out), "--layers", "1",
                    "--heads", "5", "--embd", "40", "--positions", "64", "--model-vocab", "1000",
                    "--train-steps", "3"], check=True, capture_output=True, timeout=300)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["vocab_size"]) == (1, 5, 1000)
    assert json.loads((out / "training.json").read_text())["train_steps"] == 3
    tokenizer = reference.tokenizer(str(out))
    assert len(tokenizer) == 1000 and tokenizer.decode([999]) == "<t999>"
