"""The floor: plain Hugging Face `generate` on one device, in this process, no HTTP, no TP.

One request at a time, as a single process serves them; reported at concurrency 1 only,
because a second in-flight request would only wait for the first. A streamer timestamps
every token, so TTFT and TPOT mean what they mean for the HTTP targets.
"""

from __future__ import annotations

import logging
import time

from benchmarks.loadgen import RequestResult

logger = logging.getLogger(__name__)


class _TokenClock:
    """A `generate` streamer that only records when each new token appears."""

    def __init__(self, start: float):
        self.start = start
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:  # generate first hands the streamer the prompt
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


class HFGenerate:
    """One model on one device; `run` serves one request like the servers do (greedy, fixed length)."""

    def __init__(self, model_dir: str, device: str, dtype: str = "auto", threads: int = 0):
        import torch
        from transformers import AutoTokenizer, GPT2LMHeadModel

        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = GPT2LMHeadModel.from_pretrained(
            model_dir, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa"
        ).to(self.device).eval()
        logger.info("hf baseline: %s on %s (%s, %d torch threads)", model_dir, self.device, dtype, torch.get_num_threads())

    def run(self, prompt: str, max_tokens: int) -> RequestResult:
        """Tokenize, generate max_tokens greedily past EOS, decode: what a server does per request."""
        start = time.perf_counter()
        clock = _TokenClock(start)
        try:
            inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            with self.torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=None,  # ignore_eos: a fixed output length
                    pad_token_id=self.tokenizer.eos_token_id,
                    streamer=clock,
                )
            n_prompt = inputs["input_ids"].shape[1]
            self.tokenizer.decode(out[0, n_prompt:])
            if self.device.type == "cuda":
                self.torch.cuda.synchronize()
        except Exception as exc:
            return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        latency = time.perf_counter() - start
        return RequestResult(
            ok=bool(clock.times),
            ttft=clock.times[0] if clock.times else None,
            last_token=clock.times[-1] if clock.times else None,
            latency=latency,
            output_tokens=len(clock.times),
            prompt_tokens=n_prompt,
            text_chunks=len(clock.times),
            tokens_from_usage=True,
        )

    def run_level(self, prompt: str, max_tokens: int, requests: int, level_timeout_s: float):
        """`requests` in turn (stopping early past the timeout); results and wall time."""
        results: list[RequestResult] = []
        start = time.perf_counter()
        for _ in range(requests):
            if time.perf_counter() - start > level_timeout_s:
                break
            results.append(self.run(prompt, max_tokens))
        return results, time.perf_counter() - start
