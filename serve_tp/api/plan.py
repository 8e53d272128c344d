"""Request to sequences: every check that needs the served model, then one SamplingParams
per choice. Bounds a schema can state live in protocol.py; here are those that need the
tokenizer, the context length or the server's limits (a 400 naming the field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from serve_tp.api.errors import APIError
from serve_tp.api.protocol import CompletionRequest
from serve_tp.config import ServeTPConfig
from serve_tp.messages import SamplingParams

SEED_MASK = 2**64 - 1
# What vanishing values mean, settled here so the engine sees the meaning, not the float:
# below 1e-5 a temperature is greedy (vLLM's _SAMPLING_EPS; logits / 1e-40 would overflow
# float32), and a top_p under float32's smallest subnormal would round to 0, so it is raised
# to 1e-8, which like it keeps only the top token. The engine no longer depends on these to
# survive: its sampler never raises and a row that fails falls back on its own.
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-8


@dataclass
class SequenceJob:
    """One choice: a prompt's ids, its sampling params, and where it goes in `choices`."""

    index: int
    prompt_text: str  # what echo returns: the prompt string, or the decode of its token ids
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    echo: bool = False


class RequestPlanner:
    """Turns a validated CompletionRequest into SequenceJobs for the served model."""

    def __init__(self, config: ServeTPConfig, tokenizer, context_length: int, model_name: str):
        self.config = config
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.context_length = context_length
        self.model_name = model_name

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
        sampling = self._sampling(req)
        max_tokens = sampling["max_tokens"]
        jobs = []
        for p_index, prompt in enumerate(prompts):
            text, ids = self._prompt(prompt, req.echo)
            # max_tokens 0 (echo scoring) still takes one position: the engine computes the
            # next token's logits into the cache slot after the prompt (and async scheduling
            # may decode one step past a finish), so a prompt must leave that slot free.
            if len(ids) + max(max_tokens, 1) > self.context_length:
                scoring = (f"; a prompt scored with max_tokens=0 may have at most {self.context_length - 1} tokens"
                           if max_tokens == 0 else "")
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context_length} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for "
                    f"the completion{scoring}). Please reduce your prompt or max_tokens.",
                    param="max_tokens", code="context_length_exceeded",
                )
            for choice in range(req.n):
                seed = None if req.seed is None else (req.seed + choice) & SEED_MASK
                params = SamplingParams(seed=seed, **sampling)
                jobs.append(SequenceJob(p_index * req.n + choice, text, ids, params, stops, req.echo))
        return jobs

    def _sampling(self, req: CompletionRequest) -> dict[str, Any]:
        """SamplingParams' fields (all but the seed) after the checks that need the server's limits."""
        cfg = self.config
        max_tokens = req.max_tokens if req.max_tokens is not None else cfg.default_max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is only allowed with echo=true "
                                "(to score the prompt)", param="max_tokens")
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                           param="min_tokens")
        if req.logprobs is not None and req.logprobs > cfg.max_logprobs:
            raise APIError(400, f"logprobs must be at most {cfg.max_logprobs}, got {req.logprobs}",
                           param="logprobs")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            bias[self._token_id(int(key), "logit_bias")] = value
        temperature = req.temperature if req.temperature is not None else cfg.default_temperature
        top_k = req.top_k or 0
        return dict(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature,
            top_p=max(req.top_p if req.top_p is not None else cfg.default_top_p, MIN_TOP_P),
            top_k=0 if top_k < 0 else top_k,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
            logit_bias=tuple(sorted(bias.items())),
            stop_token_ids=tuple(sorted({self._token_id(i, "stop_token_ids") for i in req.stop_token_ids or ()})),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
            # Echo with logprobs scores the prompt too (lm-eval's loglikelihood requests).
            prompt_logprobs=req.logprobs if req.echo else None,
        )

    def _token_id(self, token_id: int, param: str) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise APIError(400, f"{param} holds token id {token_id}, outside the vocabulary [0, {self.vocab_size})",
                           param=param)
        return token_id

    def _prompt(self, prompt: Union[str, list[int]], echo: bool) -> tuple[str, list[int]]:
        """(the text echo returns, the ids) of one prompt, given as text or as token ids.

        Token ids echo as their decode with special tokens spelled out, so the echoed text
        holds every prompt token the logprobs list (lm-eval's contexts may start with EOS).
        """
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt, str):
            if len(prompt) > self.config.max_prompt_chars:
                raise APIError(400, f"prompt is {len(prompt)} characters; the limit is {self.config.max_prompt_chars}",
                               param="prompt")
            ids = self.tokenizer.encode(prompt).ids
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", param="prompt")
            return prompt, ids
        ids = [self._token_id(token_id, "prompt") for token_id in prompt]
        return (self.tokenizer.decode(ids, skip_special_tokens=False) if echo else ""), ids
