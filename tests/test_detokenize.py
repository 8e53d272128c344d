"""Streaming text: no split characters, stop strings cut exactly and never leak."""

import pytest
from tokenizers import Tokenizer

from serve_tp.api.detokenize import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_file(f"{tiny_model_dir}/tokenizer.json")


@pytest.mark.parametrize("text", ["café naïve résumé", "日本語 and 中文 🙂🚀", "plain ascii text, numbers 42"])
def test_streamed_pieces_join_to_the_full_decode_and_are_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_character_split_over_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("🙂").ids
    assert len(ids) > 1, "the tiny tokenizer splits this emoji into byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[:-1]) == ""
    assert detok.push(ids[-1:]) == "🙂"


@pytest.mark.parametrize(
    "pieces, stops, emitted",
    [
        (["Hello wor", "ld. Bye"], ["world"], "Hello "),
        (["abc", "STO", "P tail"], ["STOP"], "abc"),
        (["ST", "AY here"], ["STOP"], "STAY here"),
        (["one\n", "\ntwo"], ["\n\n", "two"], "one"),
        (["no stops here"], [], "no stops here"),
    ],
)
def test_stop_matcher(pieces, stops, emitted):
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    assert out == emitted


def test_stop_prefix_is_held_until_it_is_decided():
    matcher = StopMatcher(["END"])
    assert matcher.feed("text E") == "text "
    assert matcher.feed("N") == ""
    assert matcher.feed("X") == "ENX"


def test_sequence_text_applies_vllms_stop_rules(tokenizer):
    from serve_tp.api.detokenize import SequenceText

    ids = tokenizer.encode(" quick brown fox quick").ids  # e.g. " ", "qu", "i", "ck", " b", "row", ...
    text = SequenceText(tokenizer, ["quick"], min_tokens=2)
    pieces = [text.push([i]) for i in ids[:-1]] + [text.push(ids[-1:], finish="length")]
    # " quick" lies within the first 2 tokens, so it does not stop; the second one does.
    assert "".join(pieces) == " quick brown fox " and text.stopped
    assert (text.produced, text.emitted) == (len(ids), len(" quick brown fox "))
    n = len(tokenizer.encode(" quick").ids)  # the tokens of " quick"; ids[n] begins " brown"
    assert tokenizer.decode(ids[:n]) == " quick"
    ended = SequenceText(tokenizer, [], stop_token_ids=[ids[n]])
    assert ended.push(ids[:n + 1], finish="stop") == " quick"  # the stop token's text is left out
    with_it = SequenceText(tokenizer, [], stop_token_ids=[ids[n]]).push(ids[:n + 1], finish="length")
    assert with_it == tokenizer.decode(ids[:n + 1]) != " quick"


def test_sequence_text_counts_the_same_however_tokens_are_batched(tokenizer):
    """A stop string ends the count at the token that completed it, and min_tokens starts
    watching at the same token, whether the engine delivered tokens one by one or several
    to a poll (that batching is timing: async scheduling changed it and usage with it)."""
    from serve_tp.api.detokenize import SequenceText

    ids = tokenizer.encode(" quick brown fox quick brown fox").ids

    def run(batch: int):
        text = SequenceText(tokenizer, ["fox"], min_tokens=3)
        out, chunks = "", [ids[i:i + batch] for i in range(0, len(ids), batch)]
        for i, chunk in enumerate(chunks):
            out += text.push(chunk, finish="length" if i == len(chunks) - 1 else None)
            if text.stopped:
                break
        return out, text.produced

    one_by_one = run(1)
    assert one_by_one[0] == " quick brown " and one_by_one[1] < len(ids)  # control: the stop cut the count
    for batch in (2, 3, 5, len(ids)):
        assert run(batch) == one_by_one, batch
