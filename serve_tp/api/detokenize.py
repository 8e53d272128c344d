"""Token ids to text while they stream: never split a character, never leak a stop string;
and each token's own bytes and printable text, for per-token logprobs."""

from __future__ import annotations

from typing import Optional, Sequence

from tokenizers import decoders

REPLACEMENT = "\ufffd"


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the byte each printable character stands for.

    Byte-level BPE spells every byte as a printable character (the space as 'Ġ'), so a
    token's string maps back to its exact bytes, even half of a UTF-8 character. The table
    is GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other
    bytes take the characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in char_of:
            char_of[byte] = chr(256 + len(char_of) - len(printable))
    return {char: byte for byte, char in char_of.items()}


BYTE_OF_CHAR = _byte_of_char()


class TokenPieces:
    """Each token's own bytes and printable text.

    Decoding one id alone turns a token that holds part of a UTF-8 character into U+FFFD
    and loses its bytes; logprobs need both what the token adds to the text (to place it:
    `text_offset`) and a faithful name for it, which for a partial character is OpenAI's
    "bytes:\\xe2\\x80" form.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token_id: int, skip_special: bool = True) -> bytes:
        """The bytes `token_id` adds to decoded text (none for a skipped special token)."""
        if skip_special and token_id in self.special:
            return b""
        data = self._bytes.get(token_id)
        if data is None:
            data = self._bytes[token_id] = self._token_bytes(token_id)
        return data

    def _token_bytes(self, token_id: int) -> bytes:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:  # an id past the tokenizer's vocabulary decodes to nothing
            return b""
        if not self.byte_level:
            return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        try:
            return bytes(BYTE_OF_CHAR[char] for char in token)
        except KeyError:  # outside the alphabet (an added token): its UTF-8, as the ByteLevel decoder does
            return token.encode()

    def text_of(self, token_id: int) -> str:
        """The token as OpenAI names it: its text, or "bytes: \\xf0\\x9f" if it is no whole character."""
        data = self.bytes_of(token_id, skip_special=False)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            # Printable ASCII as itself, any other byte as \\xNN (Python's bytes repr, unquoted).
            return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # slices of self.ids: lists already

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


class SequenceText:
    """One sequence's output text as its tokens arrive: decoded whole characters, cut at the
    first stop string, with vLLM's two rules around stopping: a stop token's text is not
    output (EOS's neither: it is special), and stop strings count only in text that comes
    after `min_tokens` tokens."""

    def __init__(self, tokenizer, stops: Sequence[str], min_tokens: int = 0, stop_token_ids: Sequence[int] = ()):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self.min_tokens = min_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.produced = 0  # tokens received
        self.emitted = 0  # characters returned

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the text (nothing more will be returned)."""
        return self._stops.stopped

    def push(self, token_ids: Sequence[int], finish: Optional[str] = None) -> str:
        """The text these tokens release; with `finish` (the engine's reason), all that is left.

        Under stop strings or `min_tokens` the tokens are taken one at a time: how many of
        them a delivery batches depends on timing (the engine's steps against the replica's
        polls), and the count a stop string leaves in `produced` (usage's completion_tokens)
        and where `min_tokens` starts watching must not. Tokens after a stop are not counted.
        """
        if self.stopped:
            return ""
        if len(token_ids) > 1 and (self._stops.stops or self.produced + len(token_ids) > self.min_tokens > self.produced):
            text = ""
            for i, token in enumerate(token_ids):
                text += self._push((token,), finish if i == len(token_ids) - 1 else None)
                if self.stopped:
                    break
            return text
        return self._push(token_ids, finish)

    def _push(self, token_ids: Sequence[int], finish: Optional[str]) -> str:
        self.produced += len(token_ids)
        if finish == "stop" and token_ids and token_ids[-1] in self.stop_token_ids:
            token_ids = token_ids[:-1]
        watch = self._stops.feed if self.produced > self.min_tokens else str
        text = watch(self._detok.push(token_ids))
        if finish is not None and not self.stopped:
            text += watch(self._detok.flush())
            if not self.stopped:
                text += self._stops.flush()
        self.emitted += len(text)
        return text
