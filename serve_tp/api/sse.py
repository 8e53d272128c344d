"""One streamed request's server-sent events, byte for byte what `json.dumps` of each chunk
would write, without building and encoding a dict per token.

A chunk differs from the last only in its choice's index, text, logprobs and finish
reason; the id, created time and model are the same for the whole stream. So the constant
parts are encoded once per request, and a chunk is a format of its few changing values,
each encoded as json.dumps would (the text by the C string encoder json.dumps itself
uses). json.dumps of the whole dict cost ~6 us a chunk, the largest single cost of the
replica's own per-token path (benchmarks/bench_stream_path.py).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Optional

DONE = "data: [DONE]\n\n"


def event(body: dict) -> str:
    """Any event, as JSON (the usage and error events: once a stream)."""
    return f"data: {json.dumps(body)}\n\n"


class CompletionChunks:
    """The text_completion chunks of one stream (json.dumps' default separators, ASCII-only)."""

    def __init__(self, request_id: str, created: int, model: str):
        self._head = (f'data: {{"id": {encode_basestring_ascii(request_id)}, "object": "text_completion", '
                      f'"created": {int(created)}, "model": {encode_basestring_ascii(model)}, '
                      f'"choices": [{{"index": ')

    def text(self, index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None) -> str:
        """One choice's chunk; `logprobs` is the rendered wire object, or None."""
        return (f'{self._head}{int(index)}, "text": {encode_basestring_ascii(text)}, '
                f'"logprobs": {"null" if logprobs is None else json.dumps(logprobs)}, '
                f'"finish_reason": {"null" if finish_reason is None else encode_basestring_ascii(finish_reason)}'
                '}]}\n\n')
