"""Completions logic between the HTTP routes and the TP group: validate, tokenize,
fan sequences out, detokenize, apply stop strings, shape OpenAI responses."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from serve_tp.config import ServeTPConfig
from serve_tp.api.detokenize import IncrementalDetokenizer, StopMatcher
from serve_tp.api.errors import APIError, error_body
from serve_tp.metrics import PROMPT_TOKENS, SequenceTimer, model_tags
from serve_tp.api.protocol import CompletionRequest
from serve_tp.messages import SamplingParams, SequenceOutput, SequenceRequest
from serve_tp.tp_group import RankFailure, TPGroup

SEED_MASK = 2**64 - 1
# Float32 guards for rank 0's sampler. logits / 1e-40 overflow to inf, and a top_p under
# float32's smallest subnormal (1.4e-45) rounds to 0 and masks every token; either way
# softmax gives NaN, torch.multinomial raises inside the engine loop, and the whole TP group
# dies for every client. Below 1e-5 a temperature is greedy (as vLLM's _SAMPLING_EPS); a
# top_p below 1/vocabulary keeps only the top token, so raising it to 1e-8 changes nothing.
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-8


@dataclass
class SequenceJob:
    """One choice: a prompt's ids, its sampling params, and where it goes in `choices`."""

    index: int
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]


@dataclass
class TextDelta:
    index: int
    text: str
    finish_reason: Optional[str]
    completion_tokens: int


class CompletionService:
    def __init__(self, config: ServeTPConfig, tokenizer, context_length: int, group: TPGroup):
        self.config = config
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.context_length = context_length
        self.group = group
        # Resolved once: `config.model_name` stats the model path on every read.
        self.model_name = config.model_name
        self.metric_tags = model_tags(self.model_name)

    # ---- validation ----
    def check_model(self, requested: Optional[str]) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def plan(self, req: CompletionRequest) -> list[SequenceJob]:
        """Every sequence the request asks for, or the first reason it is invalid (400)."""
        cfg = self.config
        self.check_model(req.model)
        unsupported = req.unsupported()
        if unsupported:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) > cfg.max_prompts_per_request:
            raise APIError(400, f"at most {cfg.max_prompts_per_request} prompts per request, got {len(prompts)}",
                           param="prompt")
        if req.n > cfg.max_n:
            raise APIError(400, f"n must be at most {cfg.max_n}, got {req.n}", param="n")
        stops = req.stops()
        if len(stops) > cfg.max_stop_sequences:
            raise APIError(400, f"at most {cfg.max_stop_sequences} stop sequences, got {len(stops)}", param="stop")
        max_tokens = req.max_tokens if req.max_tokens is not None else cfg.default_max_tokens
        temperature = req.temperature if req.temperature is not None else cfg.default_temperature
        if temperature < GREEDY_BELOW_TEMPERATURE:
            temperature = 0.0
        top_p = max(req.top_p if req.top_p is not None else cfg.default_top_p, MIN_TOP_P)
        jobs = []
        for p_index, prompt in enumerate(prompts):
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if len(prompt) > cfg.max_prompt_chars:
                raise APIError(400, f"prompt is {len(prompt)} characters; the limit is {cfg.max_prompt_chars}",
                               param="prompt")
            ids = self.tokenizer.encode(prompt).ids
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", param="prompt")
            if len(ids) + max_tokens > self.context_length:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context_length} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for "
                    f"the completion). Please reduce your prompt or max_tokens.",
                    param="max_tokens", code="context_length_exceeded",
                )
            for choice in range(req.n):
                seed = None if req.seed is None else (req.seed + choice) & SEED_MASK
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        top_k=req.top_k or 0, seed=seed, ignore_eos=req.ignore_eos)
                jobs.append(SequenceJob(p_index * req.n + choice, prompt, ids, params, stops))
        return jobs

    # ---- one sequence ----
    async def _run(self, job: SequenceJob, request_id: str) -> AsyncIterator[TextDelta]:
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(job.stops)
        produced = 0
        request = SequenceRequest(f"{request_id}-{job.index}", tuple(job.prompt_ids), job.params)
        async for item in self._timed(self.group.generate(request)):
            if item.error:
                raise APIError(503, f"the model group failed while generating: {item.error}",
                               code="engine_failure", headers={"Retry-After": "5"})
            produced += len(item.token_ids)
            finish = item.finish_reason
            text = stops.feed(detok.push(item.token_ids))
            if stops.stopped:  # leaving the generator cancels the sequence on rank 0
                yield TextDelta(job.index, text, "stop", produced)
                return
            if finish is not None:
                text += stops.feed(detok.flush())
                if stops.stopped:
                    finish = "stop"
                else:
                    text += stops.flush()
                yield TextDelta(job.index, text, "stop" if finish == "cancelled" else finish, produced)
                return
            if text:
                yield TextDelta(job.index, text, None, produced)

    async def _timed(self, items: AsyncIterator[SequenceOutput]) -> AsyncIterator[SequenceOutput]:
        """Rank 0's items for one sequence, timed as they arrive (TTFT, TPOT, tokens)."""
        timer = SequenceTimer(self.metric_tags)
        try:
            async for item in items:
                timer.tokens_arrived(len(item.token_ids))
                yield item
        finally:
            timer.finished()

    @staticmethod
    def _prompt_tokens(req: CompletionRequest, jobs: list[SequenceJob]) -> int:
        """Once per prompt, not per choice, as OpenAI's `usage` counts them."""
        return sum(len(j.prompt_ids) for j in jobs[:: req.n])

    def _count_prompt_tokens(self, req: CompletionRequest, jobs: list[SequenceJob]) -> None:
        PROMPT_TOKENS.inc(self._prompt_tokens(req, jobs), self.metric_tags)

    def _usage(self, req: CompletionRequest, jobs: list[SequenceJob], tokens: dict[int, int]) -> dict:
        prompt_tokens, completion_tokens = self._prompt_tokens(req, jobs), sum(tokens.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _merged(self, jobs: list[SequenceJob], request_id: str) -> AsyncIterator[TextDelta]:
        """All sequences of a request, interleaved as their tokens arrive."""
        if len(jobs) == 1:
            async for delta in self._run(jobs[0], request_id):
                yield delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job):
            try:
                async for delta in self._run(job, request_id):
                    await queue.put(delta)
                await queue.put(None)
            except BaseException as exc:
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        try:
            done = 0
            while done < len(jobs):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    # ---- responses ----
    async def complete(self, req: CompletionRequest, jobs: list[SequenceJob]) -> dict:
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self._count_prompt_tokens(req, jobs)
        texts = {job.index: (job.prompt_text if req.echo else "") for job in jobs}
        finish, tokens = {}, {}
        async with self._deadline():
            async for d in self._merged(jobs, request_id):
                texts[d.index] += d.text
                tokens[d.index] = d.completion_tokens
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
        return {
            "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"index": j.index, "text": texts[j.index], "logprobs": None,
                         "finish_reason": finish.get(j.index, "length")} for j in jobs],
            "usage": self._usage(req, jobs, tokens),
        }

    async def stream(self, req: CompletionRequest, jobs: list[SequenceJob]) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta, optional usage, then [DONE].

        Errors after the 200 has gone out can only be told in-band, as an error event.
        """
        request_id, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name
        self._count_prompt_tokens(req, jobs)

        def chunk(index: int, text: str, finish: Optional[str]) -> str:
            body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        tokens = {}
        try:
            if req.echo:
                for job in jobs:
                    yield chunk(job.index, job.prompt_text, None)
            async with self._deadline():
                async for d in self._merged(jobs, request_id):
                    tokens[d.index] = d.completion_tokens
                    if d.text or d.finish_reason:
                        yield chunk(d.index, d.text, d.finish_reason)
            if req.stream_options and req.stream_options.include_usage:
                body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": self._usage(req, jobs, tokens)}
                yield f"data: {json.dumps(body)}\n\n"
        except APIError as err:
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
        yield "data: [DONE]\n\n"

    def _deadline(self):
        return _Deadline(self.config.request_timeout_s)


class _Deadline:
    """asyncio.timeout that becomes a 504 and turns a lost rank into a 503."""

    def __init__(self, seconds: float):
        self._timeout = asyncio.timeout(seconds)
        self.seconds = seconds

    async def __aenter__(self):
        await self._timeout.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb):
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError as timeout:
            raise APIError(504, f"request did not finish within request_timeout_s={self.seconds:g}",
                           code="timeout") from timeout
        if isinstance(exc, RankFailure):
            raise APIError(503, f"the model group is unavailable: {exc}", code="engine_failure",
                           headers={"Retry-After": "5"}) from exc
        return False
