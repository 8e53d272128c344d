"""The floor: plain Hugging Face `generate` on one device, in this process, no HTTP, no TP.

One request at a time, as a single process serves them; reported at concurrency 1 only,
because a second in-flight request would only wait for the first. A streamer timestamps
every token, so TTFT and TPOT mean what they mean for the HTTP targets.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

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
    """One model on one device; `run` serves one request like the servers do (fixed length)."""

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

    def run(self, prompt: str, max_tokens: int, temperature: float = 0, top_p: Optional[float] = None,
            top_k: Optional[int] = None) -> RequestResult:
        """Tokenize, generate max_tokens past EOS, decode: what a server does per request.

        temperature 0 is greedy; otherwise HF's sampler with top_p/top_k (None or 0: off).
        """
        start = time.perf_counter()
        clock = _TokenClock(start)
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": max(top_k or 0, 0),
                        "top_p": 1.0 if top_p is None else top_p}
        try:
            inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            with self.torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_tokens,
                    **sampling,
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
            greedy=temperature == 0,
            max_tokens=max_tokens,
            ttft=clock.times[0] if clock.times else None,
            last_token=clock.times[-1] if clock.times else None,
            latency=latency,
            output_tokens=len(clock.times),
            prompt_tokens=n_prompt,
            text_chunks=len(clock.times),
            tokens_from_usage=True,
        )

    def run_bodies(self, bodies: Sequence[dict], level_timeout_s: float) -> tuple[list[RequestResult], float]:
        """The completion bodies in turn, one at a time (stopping early past the timeout);
        results and wall time."""
        results: list[RequestResult] = []
        start = time.perf_counter()
        for index, body in enumerate(bodies):
            if time.perf_counter() - start > level_timeout_s:
                break
            sent_at = time.perf_counter() - start
            res = self.run(body["prompt"], body["max_tokens"], body.get("temperature", 0),
                           body.get("top_p"), body.get("top_k"))
            res.index, res.sent_at = index, sent_at
            results.append(res)
        return results, time.perf_counter() - start
