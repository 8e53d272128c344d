"""Benchmark serve_tp against the tutorial's design and plain Hugging Face, side by side.

Workloads (--workload, default both; benchmarks/plan.py, benchmarks/workload.py):
  fixed      every request the same --prompt-tokens prompt and exactly --max-tokens output
             tokens; every load runs once per --sampling kind (greedy, then sampled at
             --temperature/--top-p/--top-k), so the two sit side by side in the table.
  realistic  prompt and output lengths drawn per request (default log-uniform, prompts
             16-900 and outputs 16-256 tokens, seeded), token-exact prompts cut with the
             model's tokenizer, greedy and sampled requests mixed (--greedy-fraction),
             every request clamped to the served context (max_model_len).
Loads: closed-loop users (--concurrency: each of N clients sends --requests-per-client
requests in turn) and open-loop Poisson arrivals (--request-rate: rate x --rate-duration-s
requests at exponential gaps, sent whether or not earlier ones finished). Every request
streams with ignore_eos, so it yields exactly its max_tokens. Each level reports
requests/s, output tokens/s, goodput (requests/s meeting --slo-ttft-ms and --slo-tpot-ms),
TTFT and TPOT percentiles and errors. Targets:

  serve_tp  the app at --base-url (running already, or started here with --start-serve-tp)
  tutorial  benchmarks/tutorial_app.py: the same TP shards, one request at a time, HF
            generate per request on every rank (started here unless --tutorial-url is given)
  hf        one process, one device, HF generate, one request at a time (closed loop, 1 user)

    python benchmarks/bench_serving.py --model /tmp/bench-tiny --tensor-parallel-size 2 \\
        --device cpu --targets serve_tp,tutorial,hf --start-serve-tp --concurrency 1,4,16 \\
        --request-rate 1,4 --out docs/results/cpu
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `serve_tp` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import client_procs, plan, report, runner, workload  # noqa: E402
from benchmarks import apps as apps_module  # noqa: E402
from benchmarks.apps import Apps  # noqa: E402

logger = logging.getLogger("bench_serving")

TARGETS = ("serve_tp", "tutorial", "hf")


def _list(p: argparse.ArgumentParser, text: str, flag: str, allowed: tuple) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        p.error(f"{flag}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="serve_tp", help=f"comma-separated, from {','.join(TARGETS)}")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="serve_tp's address (routes under /v1)")
    p.add_argument("--tutorial-url", default=None,
                   help="a tutorial app already running; if unset, the script starts one on the local Serve")
    p.add_argument("--workload", default="fixed,realistic", help="comma-separated, from fixed,realistic")
    p.add_argument("--concurrency", default="1,8,32,128", help="closed-loop levels: users (requests in flight); '' for none")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each closed-loop user sends per level")
    p.add_argument("--request-rate", default="", help="open-loop levels: Poisson arrival rates in req/s, e.g. 2,8,32")
    p.add_argument("--rate-duration-s", type=float, default=30,
                   help="each rate sends rate x this many requests (at least 1)")
    p.add_argument("--sampling", default="greedy,sampled",
                   help="fixed workload: run every load for each of greedy,sampled")
    p.add_argument("--temperature", type=float, default=1.0, help="sampled requests' temperature (> 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="sampled requests' top_p")
    p.add_argument("--top-k", type=int, default=None, help="sampled requests' top_k (not sent when unset)")
    p.add_argument("--greedy-fraction", type=float, default=0.5, help="realistic workload: share of greedy requests")
    p.add_argument("--prompt-tokens", type=int, default=128, help="fixed workload: prompt length in tokens")
    p.add_argument("--prompt", default=None, help="fixed workload: use this prompt instead of building one")
    p.add_argument("--max-tokens", type=int, default=128, help="fixed workload: output tokens per request")
    p.add_argument("--realistic-prompt-tokens", default=workload.REALISTIC_PROMPT,
                   help="realistic prompt lengths: fixed:N, uniform:LOW:HIGH or loguniform:LOW:HIGH")
    p.add_argument("--realistic-output-tokens", default=workload.REALISTIC_OUTPUT, help="realistic output lengths")
    p.add_argument("--seed", type=int, default=0, help="seeds the realistic lengths, the greedy/sampled mix and arrivals")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="clamp requests to this context (default: the server's /v1/models, else the model's)")
    p.add_argument("--slo-ttft-ms", type=float, default=200, help="goodput: time to first token at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=20, help="goodput: time per output token at most this")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per target and sampling kind")
    p.add_argument("--client-processes", default="1",
                   help="client processes the load is split over (each its own event loop; closed-loop users "
                        "or open-loop arrivals divided among them, results merged): one process reads about "
                        "35-75k streamed chunks/s a core (benchmarks/client_ceiling.py), so a faster server "
                        "needs more. 'auto': cpu_count // 8, between 1 and 4 (1 on small machines, where the "
                        "processes would take the server's cores)")
    p.add_argument("--request-timeout-s", type=float, default=600)
    p.add_argument("--level-timeout-s", type=float, default=600,
                   help="no new request starts after this long in one level")
    p.add_argument("--model", default=None,
                   help="local model directory: tokenizer for the prompts, weights for hf/tutorial/--start-serve-tp")
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
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the Ray cluster this script starts (the Serve controller, proxy and "
                        "replicas read it), e.g. RAY_SERVE_ENABLE_HA_PROXY=1; also read from $SERVE_ENV "
                        "(space-separated). With RAY_SERVE_ENABLE_DIRECT_INGRESS=1 alone, requests go to the "
                        "replica's own port, past the proxy")
    p.add_argument("--cpu-profile", action="store_true",
                   help="serve_tp on this machine: CPU ms per request and per chunk of the proxy, replica, "
                        "ranks and this client, per level (benchmarks/proc_cpu.py)")
    p.add_argument("--serve-port", type=int, default=8000, help="HTTP port when this script starts Serve")
    p.add_argument("--api-key", default=os.environ.get("SERVE_TP_API_KEY"),
                   help="sent as `Authorization: Bearer` (default: $SERVE_TP_API_KEY, as serve_tp reads it)")
    p.add_argument("--out", default=None, help="directory for NAME.json, NAME.md, NAME.png (e.g. docs/results/h100x2)")
    p.add_argument("--out-name", default="results", help="file name stem in --out")
    args = p.parse_args(argv)
    args.targets = _list(p, args.targets, "--targets", TARGETS)
    args.workload = _list(p, args.workload, "--workload", plan.WORKLOADS)
    args.sampling = _list(p, args.sampling, "--sampling", plan.SAMPLING_KINDS)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
        args.request_rate = plan.parse_rates(args.request_rate)
        args.prompt_dist = workload.LengthDist.parse(args.realistic_prompt_tokens)
        args.output_dist = workload.LengthDist.parse(args.realistic_output_tokens)
    except ValueError as exc:
        p.error(str(exc))
    try:
        args.client_processes = (client_procs.default_processes(os.cpu_count()) if args.client_processes == "auto"
                                 else int(args.client_processes))
    except ValueError:
        p.error(f"--client-processes: a number or auto, got {args.client_processes!r}")
    if args.client_processes < 1:
        p.error(f"--client-processes must be >= 1, got {args.client_processes}")
    if any(c < 1 for c in args.concurrency):
        p.error(f"--concurrency levels must be >= 1, got {args.concurrency}")
    if not args.concurrency and not args.request_rate:
        p.error("no load: give --concurrency levels, --request-rate rates, or both")
    for name in ("requests_per_client", "prompt_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        p.error(f"--temperature is the sampled requests' and must be > 0, got {args.temperature}")
    if not 0 <= args.greedy_fraction <= 1:
        p.error(f"--greedy-fraction must be in [0, 1], got {args.greedy_fraction}")
    needs_model = ("hf" in args.targets) or ("tutorial" in args.targets and not args.tutorial_url) or args.start_serve_tp
    if needs_model and not args.model:
        p.error("--model DIR is needed to run hf, to start the tutorial app, or with --start-serve-tp")
    if "realistic" in args.workload and not args.model:
        p.error("the realistic workload cuts token-exact prompts with the model's tokenizer: give --model DIR "
                "(or --workload fixed)")
    try:
        args.serve_env = apps_module.parse_serve_env(args.serve_env, os.environ.get("SERVE_ENV", ""))
    except ValueError as exc:
        p.error(str(exc))
    if args.served_model_name is None and args.model:
        args.served_model_name = Path(args.model).name if Path(args.model).is_dir() else args.model
    return args


FILLER = "The quick brown fox jumps over the lazy dog. "
FILLER_GPT2_TOKENS = 10  # what GPT-2's BPE makes of FILLER


def load_tokenizer(args: argparse.Namespace):
    if not args.model:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.model)


def build_prompt(args: argparse.Namespace, tok) -> tuple[str, Optional[int]]:
    """The fixed prompt and its token count (None when no tokenizer is at hand).

    An ordinary sentence repeated, cut to exactly --prompt-tokens tokens with the model's
    tokenizer; without one, repeated to about that many GPT-2 tokens (the server's `usage`
    reports the real count). Not one word repeated: a random test model answers that
    mostly with EOS, which streams no visible text.
    """
    if tok is None:
        return (args.prompt if args.prompt is not None
                else (FILLER * -(-args.prompt_tokens // FILLER_GPT2_TOKENS)).strip()), None
    if args.prompt is not None:
        return args.prompt, len(tok(args.prompt)["input_ids"])
    ids = tok(FILLER * args.prompt_tokens)["input_ids"][: args.prompt_tokens]
    text = tok.decode(ids)
    return text, len(tok(text)["input_ids"])


def prompt_source(tok) -> Optional[workload.PromptSource]:
    """Realistic prompts are cut from ordinary prose (the package's corpus), varied per request."""
    if tok is None:
        return None
    from serve_tp.model.tiny_model import CORPUS

    return workload.PromptSource(lambda text: tok(text)["input_ids"], tok.decode, CORPUS.read_text())


def _command(cmd: list[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
    except Exception:
        return None


def run_header(args: argparse.Namespace, n_prompt: Optional[int]) -> dict:
    """The `run` header of the results JSON: what was measured, where, with which settings."""
    model_name = args.served_model_name or "gpt2"
    gpus = _command(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) if args.device == "cuda" else None
    workloads = {}
    if "fixed" in args.workload:
        workloads["fixed"] = f"prompt {n_prompt or args.prompt_tokens} tokens, output {args.max_tokens} tokens"
    if "realistic" in args.workload:
        workloads["realistic"] = (f"prompt {args.prompt_dist}, output {args.output_dist} tokens, "
                                  f"{args.greedy_fraction:.0%} greedy, seed {args.seed}")
    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
        "targets": ",".join(args.targets), "model": model_name, "device": args.device,
        "gpus": gpus.splitlines() if gpus else None, "cpu_count": os.cpu_count(),
        "tensor_parallel_size": args.tensor_parallel_size, "client_processes": args.client_processes,
        "sampling": {"fixed_kinds": args.sampling, "greedy": {"temperature": 0},
                     "sampled": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
                     "realistic_greedy_fraction": args.greedy_fraction},
        "workloads": workloads,
        "prompt_tokens": n_prompt, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
        "concurrency": ",".join(map(str, args.concurrency)),
        "request_rates": ",".join(f"{r:g}" for r in args.request_rate), "rate_duration_s": args.rate_duration_s,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "serve_env": args.serve_env, "serve_tp_args": args.serve_tp_arg, "command": " ".join(sys.argv),
        "max_model_len": {},
    }


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    # The prompts are tokenized here before Ray starts its workers; quiet the tokenizers warning.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise (runner's probes)
    tok = load_tokenizer(args)
    prompt, n_prompt = build_prompt(args, tok)
    run_info = run_header(args, n_prompt)
    logger.info("settings: %s", run_info)
    levels = plan.plan_levels(args.workload, args.sampling, args.concurrency, args.request_rate)
    sampled = plan.SamplingSettings(args.temperature, args.top_p, args.top_k)
    bodies = plan.Bodies(args.served_model_name or "gpt2", sampled, prompt, n_prompt, args.max_tokens,
                         args.prompt_dist, args.output_dist, args.greedy_fraction, args.seed,
                         prompt_source(tok) if "realistic" in args.workload else None)
    apps = Apps(args)
    rows: list[dict] = []
    print("\n".join(report.header()), flush=True)
    try:
        for target in args.targets:
            if target == "hf":
                rows += runner.bench_hf(levels, bodies, args, run_info)
                continue
            if target == "serve_tp":
                base = apps.start_serve_tp() if args.start_serve_tp else args.base_url
            else:
                base = args.tutorial_url or apps.start_tutorial()
            logger.info("benchmarking %s at %s", target, runner.completions_url(base))
            rows += asyncio.run(runner.bench_http(target, base, levels, bodies, args, run_info))
    finally:
        apps.stop()
    print("\n" + report.markdown_table(rows, run_info["slo"]))
    for r in rows:
        where = f"{r['target']}, {r.get('workload')}, {report.load_label(r)}"
        if r.get("no_visible_text"):
            print(f"note ({where}): {r['no_visible_text']} requests streamed no visible text (all tokens "
                  "decode to ''): TTFT is their first choice chunk, no TPOT")
        for err in r["error_samples"]:
            print(f"error ({where}): {err}")
    if args.out:
        for path in report.write_outputs(Path(args.out), run_info, rows, args.out_name):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
