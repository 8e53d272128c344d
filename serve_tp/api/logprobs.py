"""OpenAI's legacy `logprobs` object, built from the engine's TokenLogprobs.

Three jobs: name each token and its alternatives (`TokenPieces`), place each token in the
returned text (`CharOffsets`: `text_offset`), and hold a generated token's logprobs back
until its text goes out (`HeldLogprobs`), so that stop strings, which hold text back and
then cut it, never let a chunk carry logprobs for text it does not carry.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Optional, Sequence

from serve_tp.api.detokenize import TokenPieces
from serve_tp.api.errors import APIError
from serve_tp.messages import TokenLogprob

# JSON has no -inf (a token the penalties or a logit_bias of -100 ruled out); OpenAI and
# vLLM send this floor instead. A NaN would be an engine fault, but must not break the JSON.
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares false: floored too


@dataclass(frozen=True)
class LogprobEntry:
    """One token of a choice: its name, logprob, top alternatives and offset in the text.

    The prompt's first token has neither logprob nor alternatives (nothing precedes it).
    """

    token: str
    logprob: Optional[float]
    top: Optional[dict[str, float]]
    offset: int


def make_entry(pieces: TokenPieces, token_id: int, scored: Optional[TokenLogprob], top_n: int,
               offset: int) -> LogprobEntry:
    """`top` holds the `top_n` best alternatives and the chosen token (OpenAI: up to n + 1)."""
    name = pieces.text_of(token_id)
    if scored is None:
        return LogprobEntry(name, None, None, offset)
    top: dict[str, float] = {}
    for alternative, logprob in scored.top[:top_n]:
        top.setdefault(pieces.text_of(alternative), finite(logprob))  # best first keeps a shared name
    top.setdefault(name, finite(scored.logprob))
    return LogprobEntry(name, finite(scored.logprob), top, offset)


def render(entries: Sequence[LogprobEntry]) -> dict:
    """The wire object: four parallel lists."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [e.top for e in entries],
        "text_offset": [e.offset for e in entries],
    }


class CharOffsets:
    """Where each token's bytes land among the characters of the text they decode to.

    A token's `start` is the index of the character holding its first byte; its `end` is
    just past the character holding its last byte, counting a character it leaves
    incomplete. A token with no bytes (a skipped special token) has end == start. Invalid
    bytes count as one U+FFFD each, as the tokenizer's lossy decode writes them.
    """

    def __init__(self, start: int = 0):
        self.chars = start  # complete characters so far
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, data: bytes) -> tuple[int, int]:
        start = self.chars
        if not data:
            return start, start
        self.chars += len(self._decoder.decode(data))
        pending = self._decoder.getstate()[0]  # bytes of a character not yet complete
        return start, self.chars + (1 if pending else 0)


def prompt_entries(pieces: TokenPieces, prompt_ids: Sequence[int],
                   scored: Optional[Sequence[Optional[TokenLogprob]]], top_n: int) -> list[LogprobEntry]:
    """The echoed prompt's entries; offsets count from the prompt's start, special tokens
    included, as the echoed text spells them."""
    if scored is None or len(scored) != len(prompt_ids):
        got = "none" if scored is None else len(scored)
        raise APIError(500, f"the engine sent prompt logprobs for {got} of {len(prompt_ids)} prompt tokens",
                       code="internal_error")
    offsets = CharOffsets()
    entries = []
    for token_id, token_scored in zip(prompt_ids, scored):
        start, _ = offsets.add(pieces.bytes_of(token_id, skip_special=False))
        entries.append(make_entry(pieces, token_id, token_scored, top_n, start))
    return entries


class HeldLogprobs:
    """Generated tokens whose logprobs wait until the text they make is sent.

    The detokenizer holds back half a character and the stop matcher a tail that may begin a
    stop string. A token is released once some of its text has gone out, or, when it adds no
    text (a special token), once the text before it has. What a stop string cuts off entirely
    is never released: its tokens are not in the returned text.
    """

    def __init__(self, pieces: TokenPieces, top_n: int, text_start: int = 0):
        self.pieces, self.top_n = pieces, top_n
        self.text_start = text_start  # where the generated text begins in the choice (after an echo)
        self._offsets = CharOffsets()
        self._held: list[tuple[int, int, LogprobEntry]] = []  # (start, end, entry), in order

    def add(self, token_ids: Sequence[int], scored: Optional[Sequence[TokenLogprob]]) -> None:
        if not token_ids:  # an output that only finishes, or only brings the prompt's logprobs
            return
        if scored is None or len(scored) != len(token_ids):
            got = "none" if scored is None else len(scored)
            raise APIError(500, f"the engine sent logprobs for {got} of {len(token_ids)} tokens",
                           code="internal_error")
        for token_id, token_scored in zip(token_ids, scored):
            start, end = self._offsets.add(self.pieces.bytes_of(token_id))
            entry = make_entry(self.pieces, token_id, token_scored, self.top_n, self.text_start + start)
            self._held.append((start, end, entry))

    def release(self, emitted: int) -> list[LogprobEntry]:
        """The held tokens that `emitted` characters of generated text have let out."""
        count = 0
        for start, end, _ in self._held:  # starts and ends only grow, so the released form a prefix
            if not (start < emitted or end <= emitted):
                break
            count += 1
        released, self._held = self._held[:count], self._held[count:]
        return [entry for _, _, entry in released]

    def release_all(self) -> list[LogprobEntry]:
        released, self._held = self._held, []
        return [entry for _, _, entry in released]
