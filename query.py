"""Stream a completion from a serve_tp service: a local `serve run` or the Anyscale service.

    python query.py "The meaning of life is" --max-tokens 32
    BASE_URL=https://tp-service-abc123.serve.anyscale.com SERVICE_TOKEN=... python query.py

The base URL and token default to $BASE_URL and $SERVICE_TOKEN (both printed by
`anyscale service deploy`), then to http://localhost:8000 and no token. Exits 0 on success;
otherwise 1, with one line on stderr: the HTTP status and the server's message, or why no
response came.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, TextIO

import httpx

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_PROMPT = "Once upon a time"


class QueryError(Exception):
    """Ends the run with its message as the one line on stderr."""


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"default: {DEFAULT_PROMPT!r}")
    parser.add_argument("--base-url", default=os.environ.get("BASE_URL") or DEFAULT_BASE_URL,
                        help="service URL, with or without /v1 (default: $BASE_URL, else %(default)s)")
    parser.add_argument("--token", default=os.environ.get("SERVICE_TOKEN") or None,
                        help="bearer token (default: $SERVICE_TOKEN, else none)")
    parser.add_argument("--max-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=None, help="default: the server's")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole completion")
    parser.add_argument("--model", default=None, help="default: the first model of GET /v1/models")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="seconds to wait to connect and for each piece of the answer (default: %(default)s)")
    args = parser.parse_args(argv)
    # OpenAI clients take base URLs ending in /v1; accept those too.
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    return args


def error_text(body: object) -> Optional[str]:
    """OpenAI's `error.message` (or a bare `error` string), else FastAPI's `detail`."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or body.get("detail") or "") or None


def server_message(response: httpx.Response) -> str:
    """The server's own words: its JSON error, else the body's first line."""
    try:
        text = error_text(response.json())
    except ValueError:
        text = None
    lines = response.text.strip().splitlines()
    return text or (lines[0][:300] if lines else "(empty body)")


def check(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()  # a streamed response has no body until read
    raise QueryError(
        f"HTTP {response.status_code} {response.reason_phrase} from {response.request.url}: "
        f"{server_message(response)}"
    )


def served_model(client: httpx.Client) -> str:
    response = client.get("/v1/models")
    check(response)
    models = response.json().get("data") or []
    if not models:
        raise QueryError(f"{response.request.url} lists no models")
    return models[0]["id"]


def stream_completion(client: httpx.Client, payload: dict, out: TextIO) -> None:
    """Write each chunk's text as it arrives; the stream must end with `data: [DONE]`."""
    with client.stream("POST", "/v1/completions", json=payload) as response:
        check(response)
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank event separators, `: keep-alive` comments
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise QueryError(f"malformed event from {response.request.url}: {data[:200]}") from None
            if "error" in chunk:  # a fault after the 200 went out arrives in the stream
                raise QueryError(f"error in the stream from {response.request.url}: {error_text(chunk)}")
            for choice in chunk.get("choices") or []:  # a usage-only chunk has none
                out.write(choice.get("text") or "")
                out.flush()
    raise QueryError("the stream ended before `data: [DONE]`")


def complete(args: argparse.Namespace, out: TextIO) -> None:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=args.timeout) as client:
        payload = {
            "model": args.model or served_model(client),
            "prompt": args.prompt,
            "max_tokens": args.max_tokens,
            "stream": not args.no_stream,
        }
        if args.temperature is not None:
            payload["temperature"] = args.temperature
        if args.no_stream:
            response = client.post("/v1/completions", json=payload)
            check(response)
            out.write(response.json()["choices"][0]["text"])
        else:
            stream_completion(client, payload, out)
        out.write("\n")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        complete(args, sys.stdout)
    except QueryError as exc:
        reason = str(exc)
    except httpx.TimeoutException:
        reason = f"no response from {args.base_url} within {args.timeout:g}s (timed out)"
    except httpx.ConnectError as exc:
        reason = f"cannot connect to {args.base_url}: {exc}"
    except httpx.HTTPError as exc:
        reason = f"{type(exc).__name__} from {args.base_url}: {exc}"
    except (ValueError, KeyError, IndexError) as exc:  # a 200 that is not an OpenAI answer
        reason = f"unexpected answer from {args.base_url}: {type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        return 130
    else:
        return 0
    sys.stdout.flush()
    print(f"query.py: error: {' '.join(reason.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
