"""Completions logic between the HTTP routes and the TP group: validate, tokenize,
fan sequences out, detokenize, apply stop strings, shape OpenAI responses (logprobs too)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from serve_tp.config import ServeTPConfig
from serve_tp.api.detokenize import SequenceText, TokenPieces
from serve_tp.api.errors import APIError, error_body
from serve_tp.api.logprobs import HeldLogprobs, LogprobEntry, prompt_entries, render
from serve_tp.metrics import PROMPT_TOKEN_COUNT, SequenceTimer, model_tags
from serve_tp.api.plan import RequestPlanner, SequenceJob
from serve_tp.api.protocol import CompletionRequest
from serve_tp.api.sse import DONE, CompletionChunks, event
from serve_tp.messages import SequenceRequest
from serve_tp.tp_group import RankFailure, SequenceRefused, TPGroup


@dataclass
class TextDelta:
    index: int
    text: str
    finish_reason: Optional[str]
    completion_tokens: int
    logprobs: Optional[list[LogprobEntry]] = None  # the tokens this text releases, when asked for


class CompletionService:
    def __init__(self, config: ServeTPConfig, tokenizer, context_length: int, group: TPGroup):
        self.config = config
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.pieces = TokenPieces(tokenizer)
        self.context_length = context_length
        self.group = group
        # Resolved once: `config.model_name` stats the model path on every read.
        self.model_name = config.model_name
        self.metric_tags = model_tags(self.model_name)
        self.planner = RequestPlanner(config, tokenizer, context_length, self.model_name)

    def plan(self, req: CompletionRequest) -> list[SequenceJob]:
        """Every sequence the request asks for, or the first reason it is invalid (400)."""
        return self.planner.plan(req)

    # ---- one sequence ----
    async def _run(self, job: SequenceJob, request_id: str) -> AsyncIterator[TextDelta]:
        params = job.params
        text = SequenceText(self.tokenizer, job.stops, params.min_tokens, params.stop_token_ids)
        held = None
        if params.logprobs is not None:
            held = HeldLogprobs(self.pieces, params.logprobs, text_start=len(job.prompt_text) if job.echo else 0)
        echo_owed = job.echo  # the echo goes out with the first output, which brings the prompt's logprobs
        request = SequenceRequest(f"{request_id}-{job.index}", tuple(job.prompt_ids), params)
        # Timed here as outputs arrive (TTFT, TPOT, tokens), not in a generator of its own: each
        # generator layer is one more resumption per output on the replica's one thread.
        timer = SequenceTimer(self.metric_tags)
        try:
            async for item in self.group.generate(request):
                timer.tokens_arrived(len(item.token_ids))
                if item.finish_reason == "error" and item.group_failed:
                    raise APIError(503, f"the model group failed while generating: {item.error}",
                                   code="engine_failure", headers={"Retry-After": "5"})
                if item.finish_reason == "error":  # this sequence alone failed; the group serves on
                    raise APIError(500, f"generation failed: {item.error or 'no reason given'}",
                                   code="generation_failed")
                prefix, logprobs = "", None
                if echo_owed:
                    prefix, echo_owed = job.prompt_text, False
                    if params.logprobs is not None:
                        logprobs = prompt_entries(self.pieces, job.prompt_ids, item.prompt_logprobs, params.logprobs)
                if held is not None:
                    held.add(item.token_ids, item.logprobs)
                finish = item.finish_reason
                new_text = text.push(item.token_ids, finish)
                if held is not None:
                    ended_whole = finish is not None and not text.stopped
                    logprobs = (logprobs or []) + (held.release_all() if ended_whole else held.release(text.emitted))
                if text.stopped or finish == "cancelled":
                    finish = "stop"  # leaving the generator after a stop string cancels the sequence on rank 0
                if prefix or new_text or finish or logprobs:
                    yield TextDelta(job.index, prefix + new_text, finish, text.produced, logprobs)
                if finish is not None:
                    return
        finally:
            timer.finished()

    @staticmethod
    def _prompt_tokens(req: CompletionRequest, jobs: list[SequenceJob]) -> int:
        """Once per prompt, not per choice, as OpenAI's `usage` counts them."""
        return sum(len(j.prompt_ids) for j in jobs[:: req.n])

    def _count_prompt_tokens(self, req: CompletionRequest, jobs: list[SequenceJob]) -> None:
        PROMPT_TOKEN_COUNT.inc(self._prompt_tokens(req, jobs), self.metric_tags)

    def _usage(self, req: CompletionRequest, jobs: list[SequenceJob], tokens: dict[int, int]) -> dict:
        prompt_tokens, completion_tokens = self._prompt_tokens(req, jobs), sum(tokens.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _merged(self, jobs: list[SequenceJob], request_id: str) -> AsyncIterator[TextDelta]:
        """All sequences of a request, interleaved as their tokens arrive."""
        if len(jobs) == 1:  # the common case, without a generator layer around it
            return self._run(jobs[0], request_id)
        return self._interleaved(jobs, request_id)

    async def _interleaved(self, jobs: list[SequenceJob], request_id: str) -> AsyncIterator[TextDelta]:
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
        texts = {job.index: "" for job in jobs}
        logprobs = {job.index: [] for job in jobs if job.params.logprobs is not None}
        finish, tokens = {}, {}
        async with self._deadline():
            async for d in self._merged(jobs, request_id):
                texts[d.index] += d.text
                tokens[d.index] = d.completion_tokens
                if d.logprobs:
                    logprobs[d.index] += d.logprobs
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
        return {
            "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"index": j.index, "text": texts[j.index],
                         "logprobs": render(logprobs[j.index]) if j.index in logprobs else None,
                         "finish_reason": finish.get(j.index, "length")} for j in jobs],
            "usage": self._usage(req, jobs, tokens),
        }

    async def stream(self, req: CompletionRequest, jobs: list[SequenceJob]) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta, optional usage, then [DONE].

        A chunk carries the logprobs of the tokens its text releases, so the chunks' logprobs
        join to the unstreamed ones. Errors after the 200 has gone out can only be told
        in-band, as an error event.
        """
        request_id, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name
        self._count_prompt_tokens(req, jobs)
        chunks = CompletionChunks(request_id, created, model)
        tokens = {}
        try:
            async with self._deadline():
                async for d in self._merged(jobs, request_id):
                    tokens[d.index] = d.completion_tokens
                    yield chunks.text(d.index, d.text, d.finish_reason,
                                      None if d.logprobs is None else render(d.logprobs))
            if req.stream_options and req.stream_options.include_usage:
                yield event({"id": request_id, "object": "text_completion", "created": created, "model": model,
                             "choices": [], "usage": self._usage(req, jobs, tokens)})
        except APIError as err:
            yield event(error_body(err.status, err.message, err.param, err.code))
        yield DONE

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
        if isinstance(exc, SequenceRefused):  # this sequence alone; the group serves on
            raise APIError(500, f"rank 0 refused the sequence: {exc}", code="generation_failed") from exc
        return False
