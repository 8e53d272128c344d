"""A short causal-LM training run for the offline test models.

A GPT-2 with random weights proves little: its logits are nearly flat (greedy choices
decided by rounding noise) or, initialised wide, so ill-conditioned that Hugging Face's
own eager and SDPA attention disagree on it. A few hundred steps on the shipped corpus
give a model that behaves like a trained one: normal initialisation (0.02), peaked
logits, and the same answer from every correct implementation.

Windows of the full context length are drawn from the corpus, so every position
embedding is trained; the last `HELD_OUT` of the tokens is never trained on, so tests
can measure the model on text it has not seen.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

HELD_OUT = 0.05  # fraction of the corpus's tokens kept for evaluation


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 1
    lr: float = 3e-3
    warmup: float = 0.1  # fraction of the steps spent ramping the learning rate up
    seed: int = 0


def split_corpus(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training tokens, held-out tokens): the held-out part is the corpus's tail."""
    cut = int(len(ids) * (1 - HELD_OUT))
    return ids[:cut], ids[cut:]


def _lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth: the usual GPT recipe, short."""
    warmup = max(1, int(settings.steps * settings.warmup))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_causal_lm(model: torch.nn.Module, ids: torch.Tensor, settings: TrainSettings,
                    device: torch.device) -> list[float]:
    """Train `model` (a GPT2LMHeadModel) in place, on `device`, on windows of `ids`; returns the losses.

    On CUDA the matmuls run in bfloat16 autocast (the GPU shapes are 100x bigger);
    on CPU in float32. The weights stay float32 either way.
    """
    train_ids, _ = split_corpus(ids)
    window = model.config.n_positions
    if len(train_ids) <= window:
        raise ValueError(f"corpus of {len(train_ids)} training tokens is too short for windows of {window}")
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    losses, started = [], time.monotonic()
    for step in range(settings.steps):
        starts = torch.randint(0, len(train_ids) - window, (settings.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s: s + window] for s in starts.tolist()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 50 == 0 or step == settings.steps - 1:
            logger.info("train step %d/%d: loss %.3f (%.1fs)", step + 1, settings.steps, losses[-1],
                        time.monotonic() - started)
    model.eval()
    return losses


@torch.inference_mode()
def evaluate(model: torch.nn.Module, ids: torch.Tensor, windows: int = 4) -> dict:
    """Held-out loss and how peaked the next-token distributions are (where the model is)."""
    _, held = split_corpus(ids)
    window = min(model.config.n_positions, len(held) // windows)
    batch = held[: windows * window].view(windows, window).to(model.device)
    out = model(batch, labels=batch)
    top2 = out.logits.topk(2, dim=-1).values
    return {
        "loss": float(out.loss),
        "top1_prob": float(out.logits.softmax(-1).amax(-1).mean()),
        "top2_gap_median": float((top2[..., 0] - top2[..., 1]).median()),
    }
