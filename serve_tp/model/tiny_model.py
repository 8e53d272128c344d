"""Build a small GPT-2 checkpoint offline: real GPT-2 classes, random weights.

Nothing can be downloaded from the Hub in CI or on an air-gapped machine, yet tests and
the offline quickstart need a real model directory (config, safetensors, tokenizer).
The tokenizer is a byte-level BPE, as GPT-2's, trained on text shipped in the package.

    python -m serve_tp.model.tiny_model models/tiny-gpt2
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CORPUS = Path(__file__).parent.parent / "data" / "corpus.txt"
EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the shipped corpus, wrapped as GPT2TokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(CORPUS)], vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS])
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def build_tiny_gpt2(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_head: int = 6,
    n_embd: int = 96,
    n_positions: int = 256,
    vocab_size: int = 600,
    model_vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a GPT-2 directory loadable with from_pretrained; returns its path.

    6 heads split over 2 and 3 ranks. `model_vocab_size` (e.g. 50257) gives the model
    GPT-2's real vocabulary shape for GPU measurements; the tokenizer gets a filler token
    for each id past its own. A wide initializer makes the random logits peaked,
    so greedy decoding is decided by clear margins rather than rounding noise.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
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
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("wrote tiny GPT-2 (%d layers, %d heads, vocab %d) to %s", n_layer, n_head, config.vocab_size, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--embd", type=int, default=96)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--model-vocab", type=int, default=None, help="pad the vocabulary to this size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = build_tiny_gpt2(args.out_dir, n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                           n_positions=args.positions, model_vocab_size=args.model_vocab, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
