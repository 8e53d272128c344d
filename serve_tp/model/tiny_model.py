"""Build a small GPT-2 checkpoint offline: real GPT-2 classes, briefly trained weights.

Nothing can be downloaded from the Hub in CI or on an air-gapped machine, yet tests and
the offline quickstart need a real model directory (config, safetensors, tokenizer).
The tokenizer is a byte-level BPE, as GPT-2's, and the model a GPT-2 trained for a few
hundred steps (pretrain.py), both on text shipped in the package (data/corpus.txt).

    python -m serve_tp.model.tiny_model models/tiny-gpt2
    # GPT-2-small's shapes, trained on a GPU:
    python -m serve_tp.model.tiny_model /tmp/gpt2s --layers 12 --heads 12 --embd 768 \\
        --positions 1024 --model-vocab 50257 --train-steps 300 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

CORPUS = Path(__file__).parent.parent / "data" / "corpus.txt"
EOS = "<|endoftext|>"
DEFAULT_TRAIN_STEPS = 800  # ~20 s on one CPU core for the default shape (held-out loss ~3.5)


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the shipped corpus, wrapped as GPT2TokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(CORPUS)], vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS], show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def corpus_ids(tokenizer):
    """The corpus as one token stream; its documents are already separated by EOS."""
    import torch

    return torch.tensor(tokenizer(CORPUS.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)


def resolve_train_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def build_tiny_gpt2(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_head: int = 6,
    n_embd: int = 96,
    n_positions: int = 256,
    vocab_size: int = 600,
    model_vocab_size: Optional[int] = None,
    seed: int = 0,
    train_steps: int = DEFAULT_TRAIN_STEPS,
    batch_size: int = 1,
    device: str = "cpu",
) -> Path:
    """Write a GPT-2 directory loadable with from_pretrained; returns its path.

    6 heads split evenly over 2 and 3 ranks, unevenly over 4 and 5. `model_vocab_size`
    (e.g. 50257) gives the model GPT-2's real vocabulary shape for GPU measurements; the
    tokenizer gets a filler token for each id past its own (never seen in training).
    `train_steps` 0 leaves the weights as initialised (normal, std 0.02).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from serve_tp.model.pretrain import TrainSettings, evaluate, train_causal_lm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    ids = corpus_ids(tokenizer)
    if model_vocab_size and model_vocab_size > len(tokenizer):
        # Filler tokens, one per id past the BPE's own, so every id the model can emit
        # decodes to visible text and a client can see (and time) each generated token.
        tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), model_vocab_size)])
    config = GPT2Config(
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    report = {"train_steps": train_steps}
    if train_steps > 0:
        settings = TrainSettings(steps=train_steps, batch_size=batch_size, seed=seed)
        losses = train_causal_lm(model, ids, settings, resolve_train_device(device))
        report.update(final_train_loss=round(losses[-1], 4), held_out=evaluate(model, ids))
    model.to("cpu")  # trained, or built under a torch.device("cuda") context
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(report, indent=1))
    logger.info("wrote tiny GPT-2 (%d layers, %d heads, vocab %d, %s) to %s",
                n_layer, n_head, config.vocab_size, report, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--embd", type=int, default=96)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--model-vocab", type=int, default=None, help="pad the vocabulary to this size")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help="optimizer steps on the shipped corpus (0: random weights); "
                             "GPU shapes want --device cuda")
    parser.add_argument("--batch-size", type=int, default=1, help="training windows per step (GPU shapes: 8 or more)")
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:N or auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = build_tiny_gpt2(args.out_dir, n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                           n_positions=args.positions, model_vocab_size=args.model_vocab, seed=args.seed,
                           train_steps=args.train_steps, batch_size=args.batch_size, device=args.device)
    print(path)


if __name__ == "__main__":
    main()
