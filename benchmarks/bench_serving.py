"""Benchmark serve_tp against the tutorial's design and plain Hugging Face, side by side.

For every concurrency level, `concurrency` clients each send `--requests-per-client`
streamed completions in turn (greedy, `ignore_eos`, so every request yields exactly
`--max-tokens` tokens), and the level reports requests/s, output tokens/s, TTFT and TPOT
percentiles and errors. Targets:

  serve_tp  the app at --base-url (running already, or started here with --start-serve-tp)
  tutorial  benchmarks/tutorial_app.py: the same TP shards, one request at a time, HF
            generate per request on every rank (started here unless --tutorial-url is given)
  hf        one process, one device, HF generate, one request at a time (concurrency 1 only)

    python benchmarks/bench_serving.py --model /tmp/bench-tiny --tensor-parallel-size 2 \\
        --device cpu --targets serve_tp,tutorial,hf --concurrency 1,4,16 --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `serve_tp` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import loadgen, report  # noqa: E402

logger = logging.getLogger("bench_serving")

TARGETS = ("serve_tp", "tutorial", "hf")
TUTORIAL_APP, TUTORIAL_PREFIX = "tutorial", "/tutorial"
SERVE_TP_APP = "serve_tp"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="serve_tp", help=f"comma-separated, from {','.join(TARGETS)}")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="serve_tp's address (routes under /v1)")
    p.add_argument("--tutorial-url", default=None,
                   help="a tutorial app already running; if unset, the script starts one on the local Serve")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma-separated levels of requests in flight")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends per level")
    p.add_argument("--prompt-tokens", type=int, default=128, help="length of the fixed prompt, in tokens")
    p.add_argument("--prompt", default=None, help="use this prompt instead of building one")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per target before the levels")
    p.add_argument("--request-timeout-s", type=float, default=600)
    p.add_argument("--level-timeout-s", type=float, default=600,
                   help="clients start no new request after this long in one level")
    p.add_argument("--model", default=None,
                   help="local model directory: tokenizer for the prompt, weights for hf/tutorial/--start-serve-tp")
    p.add_argument("--served-model-name", default=None, help="`model` field sent; default: the directory's name")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hf-threads", type=int, default=0, help="torch threads for hf (0: torch's default)")
    p.add_argument("--start-serve-tp", action="store_true",
                   help="start serve_tp.app:build_app here (route /) instead of expecting it at --base-url")
    p.add_argument("--serve-tp-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra build_app arg for --start-serve-tp (repeatable), e.g. max_batch_size=64")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto) to start apps on; default: start a local one")
    p.add_argument("--serve-port", type=int, default=8000, help="HTTP port when this script starts Serve")
    p.add_argument("--api-key", default=os.environ.get("SERVE_TP_API_KEY"),
                   help="sent as `Authorization: Bearer` (default: $SERVE_TP_API_KEY, as serve_tp reads it)")
    p.add_argument("--out", default=None, help="directory for results.json, results.md, results.png")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or not args.targets:
        p.error(f"unknown targets {bad}; choose from {', '.join(TARGETS)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency must be integers separated by commas, got '{args.concurrency}'")
    if any(c < 1 for c in args.concurrency):
        p.error(f"--concurrency levels must be >= 1, got {args.concurrency}")
    for name in ("requests_per_client", "prompt_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    needs_model = ("hf" in args.targets) or ("tutorial" in args.targets and not args.tutorial_url) or args.start_serve_tp
    if needs_model and not args.model:
        p.error("--model DIR is needed to run hf, to start the tutorial app, or with --start-serve-tp")
    if args.served_model_name is None and args.model:
        args.served_model_name = Path(args.model).name if Path(args.model).is_dir() else args.model
    return args


FILLER = "The quick brown fox jumps over the lazy dog. "
FILLER_GPT2_TOKENS = 10  # what GPT-2's BPE makes of FILLER


def build_prompt(args: argparse.Namespace) -> tuple[str, Optional[int]]:
    """The fixed prompt and its token count (None when no tokenizer is at hand).

    An ordinary sentence repeated, cut to exactly --prompt-tokens tokens with the model's
    tokenizer; without one, repeated to about that many GPT-2 tokens (the server's `usage`
    reports the real count). Not one word repeated: a random test model answers that
    mostly with EOS, which streams no visible text.
    """
    if args.prompt is not None and not args.model:
        return args.prompt, None
    if not args.model:
        return (FILLER * -(-args.prompt_tokens // FILLER_GPT2_TOKENS)).strip(), None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    if args.prompt is not None:
        return args.prompt, len(tok(args.prompt)["input_ids"])
    ids = tok(FILLER * args.prompt_tokens)["input_ids"][: args.prompt_tokens]
    text = tok.decode(ids)
    return text, len(tok(text)["input_ids"])


def check_context(args: argparse.Namespace, prompt_tokens: Optional[int]) -> None:
    """Prompt + output must fit the model's context, or the servers cut or reject requests."""
    if not args.model or prompt_tokens is None or not Path(args.model, "config.json").is_file():
        return
    import json

    cfg = json.loads(Path(args.model, "config.json").read_text())
    ctx = cfg.get("n_positions") or cfg.get("max_position_embeddings")
    if ctx and prompt_tokens + args.max_tokens > ctx:
        raise SystemExit(
            f"prompt ({prompt_tokens} tokens) + --max-tokens ({args.max_tokens}) = "
            f"{prompt_tokens + args.max_tokens} exceeds the model's context ({ctx}); lower one of them"
        )


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Apps:
    """The Serve apps this script starts, on a local Ray or a joined one; removed at the end."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started: list[str] = []
        self.own_ray = False

    def _ray(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            return
        a = self.args
        if a.ray_address:
            ray.init(address=a.ray_address, logging_level=logging.WARNING)
        else:
            if _port_in_use(a.serve_port):
                raise SystemExit(
                    f"port {a.serve_port} is taken (a `serve run` of serve_tp?). Join its cluster with "
                    f"--ray-address auto (after `ray start --head`), or pick another --serve-port"
                )
            # Logical CPUs: bundles of both apps must fit even on a 2-core machine; the ranks
            # only heartbeat while another target is measured.
            need = 2 * (a.tensor_parallel_size + 1)  # serve_tp's and the tutorial's bundles
            # address="local": a fresh instance even if another one (a test's, a `serve run`) is up.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                     include_dashboard=False, logging_level=logging.WARNING)
            self.own_ray = True
        serve.start(http_options={"host": "127.0.0.1", "port": a.serve_port})

    def start(self, name: str, app, route_prefix: str) -> None:
        from ray import serve

        self._ray()
        logger.info("starting Serve app %s at %s (model load and group setup)", name, route_prefix)
        serve.run(app, name=name, route_prefix=route_prefix)
        self.started.append(name)

    def start_tutorial(self) -> str:
        from benchmarks.tutorial_app import build_app

        a = self.args
        self.start(TUTORIAL_APP, build_app({
            "model": a.model, "served_model_name": a.served_model_name,
            "tensor_parallel_size": a.tensor_parallel_size, "device": a.device,
        }), TUTORIAL_PREFIX)
        return f"http://127.0.0.1:{a.serve_port}{TUTORIAL_PREFIX}"

    def start_serve_tp(self) -> str:
        from serve_tp.api.app import build_app

        a = self.args
        extra = dict(kv.split("=", 1) for kv in a.serve_tp_arg)
        self.start(SERVE_TP_APP, build_app({
            "model": a.model, "served_model_name": a.served_model_name,
            "tensor_parallel_size": a.tensor_parallel_size, "device": a.device, **extra,
        }), "/")
        return f"http://127.0.0.1:{a.serve_port}"

    def stop(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        if self.own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            for name in self.started:
                serve.delete(name)


def _url(base: str) -> str:
    return base.rstrip("/") + "/v1/completions"


async def bench_http(target: str, base: str, body: dict, args) -> list[dict]:
    url = _url(base)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    for _ in range(args.warmup):
        r = await loadgen.run_level(
            url, body, 1, 1, request_timeout_s=args.request_timeout_s, level_timeout_s=1e9, headers=headers
        )
        if not r[0][0].ok:
            raise SystemExit(f"{target}: warm-up request to {url} failed: {r[0][0].error}")
    rows = []
    for c in args.concurrency:
        results, duration = await loadgen.run_level(
            url, body, c, args.requests_per_client,
            request_timeout_s=args.request_timeout_s, level_timeout_s=args.level_timeout_s, headers=headers,
        )
        rows.append(loadgen.summarize(target, c, results, duration))
        print(report.markdown_table(rows[-1:]).splitlines()[2], flush=True)
        if target == "serve_tp":
            rows[-1]["engine_step_ms"] = await engine_step_ms(base, headers)
            print(f"    rank 0 step (ms, last 256 working steps): {rows[-1]['engine_step_ms']}", flush=True)
    return rows


async def engine_step_ms(base: str, headers: Optional[dict]) -> Optional[dict]:
    """Where rank 0's recent steps spent their time (plan broadcast, forward, sampling), from /health."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            ranks = (await client.get(base.rstrip("/") + "/health", headers=headers)).json()["ranks"]
        return ranks[0].get("step_ms")
    except Exception:  # a health endpoint that differs is no reason to lose the run
        return None


def bench_hf(prompt: str, args) -> list[dict]:
    from benchmarks.hf_baseline import HFGenerate

    hf = HFGenerate(args.model, args.device, threads=args.hf_threads)
    for _ in range(args.warmup):
        hf.run(prompt, args.max_tokens)
    results, duration = hf.run_level(prompt, args.max_tokens, args.requests_per_client, args.level_timeout_s)
    row = loadgen.summarize("hf", 1, results, duration)
    print(report.markdown_table([row]).splitlines()[2], flush=True)
    return [row]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    # The prompt is tokenized here before Ray forks its workers; quiet the tokenizers warning.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    prompt, n_prompt = build_prompt(args)
    check_context(args, n_prompt)
    model_name = args.served_model_name or "gpt2"
    body = loadgen.completion_body(model_name, prompt, args.max_tokens)
    run_info = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "targets": ",".join(args.targets), "model": model_name, "device": args.device,
        "tensor_parallel_size": args.tensor_parallel_size, "prompt_tokens": n_prompt,
        "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
        "concurrency": ",".join(map(str, args.concurrency)),
    }
    logger.info("settings: %s", run_info)
    apps = Apps(args)
    rows: list[dict] = []
    print("\n".join(report.header()), flush=True)
    try:
        for target in args.targets:
            if target == "hf":
                rows += bench_hf(prompt, args)
                continue
            if target == "serve_tp":
                base = apps.start_serve_tp() if args.start_serve_tp else args.base_url
            else:
                base = args.tutorial_url or apps.start_tutorial()
            logger.info("benchmarking %s at %s", target, _url(base))
            rows += asyncio.run(bench_http(target, base, body, args))
    finally:
        apps.stop()
    table = report.markdown_table(rows)
    print("\n" + table)
    for r in rows:
        if r.get("no_visible_text"):
            print(f"note ({r['target']}, concurrency {r['concurrency']}): {r['no_visible_text']} requests streamed "
                  "no visible text (all tokens decode to ''): TTFT is their first choice chunk, no TPOT")
        for err in r["error_samples"]:
            print(f"error ({r['target']}, concurrency {r['concurrency']}): {err}")
    if args.out:
        for path in report.write_outputs(Path(args.out), run_info, rows):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
