"""Where a model's files come from: a local directory, or a snapshot from the Hub.

Imports no torch: the HTTP replica uses it to find the tokenizer, the ranks the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

OFFLINE_HINT = (
    "With no Hub access, build a small offline GPT-2 with "
    "`python -m serve_tp.model.tiny_model models/tiny-gpt2` and pass model=models/tiny-gpt2, "
    "or pass model=<a local directory holding config.json, weights and tokenizer>."
)

# Enough to load weights and tokenizer; skips the TF, Flax, ONNX and Rust copies.
HUB_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
]


class ModelSourceError(RuntimeError):
    """The model cannot be found or fetched; the message says what to do instead."""


def resolve_model_dir(model: str, revision: Optional[str] = None) -> Path:
    """A directory with config.json and tokenizer files for `model` (path or Hub id)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {path} has no config.json")
        return path.resolve()
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise ModelSourceError(f"model directory {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise ModelSourceError(
            f"could not fetch model '{model}' from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). {OFFLINE_HINT}"
        ) from exc


def read_model_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def context_length(model_config: dict, max_model_len: Optional[int] = None) -> int:
    """Most tokens (prompt + completion) served: the model's context, capped by max_model_len.

    The replica validates requests and every rank sizes its KV cache with this one value.
    """
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if key in model_config:
            return min(int(model_config[key]), max_model_len or int(model_config[key]))
    raise ModelSourceError("model config names no context length (n_positions)")


UNSUPPORTED_FLAGS = ("reorder_and_upcast_attn", "add_cross_attention")


def check_model_shardable(model_config: dict, tensor_parallel_size: int) -> None:
    """The one check that a model can be served on this many ranks, with the numbers.

    The replica runs it at startup, before any rank loads weights; every rank's loader
    runs it again on the same config.json, so no second rule can drift from this one.
    """
    from serve_tp.model.sharding import ShardPlan

    if model_config.get("model_type") != "gpt2":
        raise ModelSourceError(
            f"serve_tp's tensor-parallel path supports GPT-2 models (model_type 'gpt2'), "
            f"got '{model_config.get('model_type')}'"
        )
    for flag in UNSUPPORTED_FLAGS:  # variants our forward does not implement
        if model_config.get(flag):
            raise ModelSourceError(f"GPT-2 configs with {flag}=true are not supported")
    ShardPlan.for_gpt2(model_config, tensor_parallel_size, rank=0)  # raises ShardingError with both numbers
