"""A stand-in `/v1/completions` server that streams OpenAI-style chunks as fast as it can.

It measures the load generator, not a model: `client_ceiling.py` points the client at it to
find how many streamed chunks a second one client process can take, and the loadgen tests
use it as a real HTTP server (real sockets, real SSE framing) with scripted answers.

Each request streams `max_tokens` chunks shaped like serve_tp's (`serve_tp/api/serving.py`:
id, object, created, model, one choice with text/logprobs/finish_reason, `json.dumps`
spacing), then a usage chunk if `stream_options.include_usage`, then `[DONE]`. Chunk bytes
are built once per length, so the server spends its CPU on writing, not on JSON. Between
chunks every stream yields to the event loop, so N streams interleave one chunk each per
turn, as an engine step hands one token to every running sequence; the client then reads
about one chunk per socket read, as it would from a real server at high load.

Scripted answers for tests: the body's `sse_script` (see `scripted_chunks`) picks an HTTP
error, empty-text chunks, no usage, an in-band error or a cut stream.

    python -m benchmarks.sse_server --port 8221          # serve until interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
from functools import lru_cache
from typing import Iterator, Optional

from aiohttp import web

WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
REQUEST_ID = "cmpl-" + "0123456789abcdef" * 2
CREATED = 1764300000


def event(body, compact: bool = False) -> bytes:
    """One SSE event, framed as serve_tp frames it (`compact`: no spaces in the JSON, as vLLM's)."""
    text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":") if compact else None)
    return f"data: {text}\n\n".encode()


def text_chunk(text: str, finish_reason: Optional[str] = None, model: str = "gpt2") -> dict:
    return {"id": REQUEST_ID, "object": "text_completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(prompt_tokens: int, completion_tokens: int, model: str = "gpt2") -> dict:
    return {"id": REQUEST_ID, "object": "text_completion", "created": CREATED, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "internal_error",
                      "param": None, "code": None}}


@lru_cache(maxsize=64)
def normal_chunks(max_tokens: int, include_usage: bool, prompt_tokens: int = 32) -> tuple[bytes, ...]:
    chunks = [event(text_chunk(WORDS[i % len(WORDS)], "length" if i == max_tokens - 1 else None))
              for i in range(max_tokens)]
    if include_usage:
        chunks.append(event(usage_chunk(prompt_tokens, max_tokens)))
    return tuple(chunks) + (event("[DONE]"),)


def scripted_chunks(script: dict, max_tokens: int) -> tuple[int, list[bytes]]:
    """(status, events) for a test's `sse_script`.

    Keys: `status` (non-200: answer with an OpenAI error body, no stream), `texts` (the
    chunks' texts, cycled; default WORDS), `empty` (indices of chunks whose text is ""),
    `usage` (default true), `usage_tokens` (completion_tokens reported, default max_tokens),
    `error_after` (an in-band error event after that many chunks, then [DONE]), `cut_after`
    (stop after that many chunks: no usage, no [DONE]), `compact` (JSON without spaces).
    """
    status = script.get("status", 200)
    if status != 200:
        return status, [json.dumps(error_body(status, script.get("message", "scripted error"))).encode()]
    empty, texts, compact = set(script.get("empty", ())), script.get("texts") or WORDS, script.get("compact", False)
    events = []
    for i in range(max_tokens):
        if i == script.get("error_after"):
            return 200, events + [event(error_body(500, "scripted in-band error"), compact), event("[DONE]")]
        if i == script.get("cut_after"):
            return 200, events
        text = "" if i in empty else texts[i % len(texts)]
        events.append(event(text_chunk(text, "length" if i == max_tokens - 1 else None), compact))
    if script.get("usage", True):
        events.append(event(usage_chunk(7, script.get("usage_tokens", max_tokens)), compact))
    return 200, events + [event("[DONE]")]


def make_app(delay_s: float = 0.0, chunk_interval_s: float = 0.0) -> web.Application:
    """The app: wait `delay_s` before answering (a slow prefill), `chunk_interval_s` between chunks."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if delay_s:
            await asyncio.sleep(delay_s)
        max_tokens = int(body.get("max_tokens") or 16)
        if "sse_script" in body:
            status, events = scripted_chunks(body["sse_script"], max_tokens)
            if status != 200:
                return web.Response(status=status, body=events[0], content_type="application/json")
        else:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = normal_chunks(max_tokens, include_usage)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in events:
            await resp.write(chunk)
            # Yield (or wait) so the other streams get their chunk before this one's next.
            await asyncio.sleep(chunk_interval_s)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


@contextlib.contextmanager
def serve_in_thread(port: int = 0, **app_kwargs) -> Iterator[str]:
    """Run the app on 127.0.0.1:port (0: a free one) in a thread with its own event loop; yields the base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(**app_kwargs), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever, name="sse_server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8221)
    p.add_argument("--delay-s", type=float, default=0.0, help="wait this long before each response")
    p.add_argument("--chunk-interval-s", type=float, default=0.0, help="wait this long between a stream's chunks")
    args = p.parse_args(argv)
    try:
        import uvloop  # the server should cost less than the client it measures

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(args.delay_s, args.chunk_interval_s), host="127.0.0.1", port=args.port,
                access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
