"""Token ids to text while they stream: never split a character, never leak a stop string."""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id list, emitting only text whose bytes are complete.

    Byte-level BPE tokens can end mid-way through a UTF-8 character; decoding then
    yields U+FFFD, so such text is held back until the next token completes it.
    (The prefix/read offsets follow vLLM's incremental detokenizer.)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of the text already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full_text = self._decode(self.ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end, whatever is still held (possibly an incomplete character)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Cuts text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string is seen."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return held[: min(hits)]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(held)), 0, -1):
                if held.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = held[len(held) - keep:]
        return held[: len(held) - keep]

    def flush(self) -> str:
        held, self._held = ("" if self.stopped else self._held), ""
        return held
