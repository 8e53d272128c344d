"""OpenAI Completions wire models (fields in the order of OpenAI's docs, extras after).

Strict types: a string where a number belongs, NaN or infinity, or a float for `n` is a
clean 400, not a coerced guess. Unknown fields are ignored, as OpenAI-compatible servers
do, except those whose meaning we cannot honour, which are rejected by `unsupported()`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: Optional[str] = None
    prompt: Union[str, list[str]]
    echo: bool = False
    frequency_penalty: Optional[float] = None
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: Optional[float] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = Field(None, ge=-1, le=1_000_000)
    ignore_eos: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(param, message) for a field set to something this server cannot do."""
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported by this server"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported by this server"
        for name in ("best_of", "suffix", "logit_bias"):
            if (self.model_extra or {}).get(name) not in (None, 1, {}, ""):
                return name, f"{name} is not supported by this server"
        return None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve_tp"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Any] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
