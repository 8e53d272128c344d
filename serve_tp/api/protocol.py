"""OpenAI Completions wire models (fields in the order of OpenAI's docs, extras after).

Strict types: a string where a number belongs, NaN or infinity, or a float for `n` is a
clean 400, not a coerced guess. Bounds that need the served model (token ids against its
vocabulary, `logprobs` against `max_logprobs`, lengths against its context) are checked by
`CompletionService.plan`. Unknown fields are ignored, as OpenAI-compatible servers do,
except those whose meaning we cannot honour, which `unsupported()` names for a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias: -100 bans a token, +100 forces it

TokenId = Annotated[int, Field(ge=0)]
TokenIdKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]

# vLLM extras and OpenAI fields that would change the output and that this server does not
# implement: (name, the values that leave the output unchanged). Anything else is a 400.
UNSUPPORTED_EXTRAS: tuple[tuple[str, tuple], ...] = (
    ("best_of", (None, 1)),
    ("suffix", (None, "")),
    ("use_beam_search", (None, False)),
    ("length_penalty", (None, 1, 1.0)),
    ("prompt_logprobs", (None,)),
    ("allowed_token_ids", (None,)),
    ("bad_words", (None, [])),
    ("include_stop_str_in_output", (None, False)),
    ("skip_special_tokens", (None, True)),
    ("spaces_between_special_tokens", (None, True)),
    ("truncate_prompt_tokens", (None,)),
    ("return_tokens_as_token_ids", (None, False)),
    ("logits_processors", (None, [])),
    ("response_format", (None,)),
    ("structured_outputs", (None,)),
    ("guided_json", (None,)),
    ("guided_regex", (None,)),
    ("guided_choice", (None,)),
    ("guided_grammar", (None,)),
)


def _one_message(explanation: str, detail: bool = True):
    """A wrap validator that reports any problem in a field as one message naming the field.

    pydantic's own errors for unions and dict keys point inside the value (`prompt.str`,
    `logit_bias.x.[key]`) with messages about the wrong branch; a client needs the rule,
    and (`detail`) which entry broke it.
    """

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError as exc:
            message = explanation
            if detail:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first.get("loc", ()) if part != "[key]")
                where = where if len(where) <= 40 else where[:37] + "..."  # a key may be megabytes
                message += f" ({where}: {first['msg']})" if where else f" ({first['msg']})"
            raise PydanticCustomError("invalid_value", message) from None

    return WrapValidator(validate)


Prompt = Annotated[
    Union[str, list[str], list[TokenId], list[list[TokenId]]],
    _one_message("prompt must be a string, a list of strings, a list of token ids (integers >= 0) "
                 "or a list of lists of token ids", detail=False),  # which union branch failed says nothing
]
LogitBias = Annotated[
    dict[TokenIdKey, Bias],
    _one_message(f"logit_bias maps token ids (strings of digits) to biases in "
                 f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]"),
]
TokenIds = Annotated[list[TokenId], _one_message("stop_token_ids must be a list of token ids (integers >= 0)")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: Optional[str] = None
    prompt: Prompt
    echo: bool = False
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[LogitBias] = None
    logprobs: Optional[int] = Field(None, ge=0, description="Top alternatives per token (0: the chosen only); "
                                    "at most the server's max_logprobs.")
    max_tokens: Optional[int] = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing.")
    n: int = Field(1, ge=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = Field(None, ge=-1, le=1_000_000)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, description="Divides the logits of tokens already "
                                                "in the prompt or the output (> 1 discourages repeats).")
    min_tokens: int = Field(0, ge=0, description="Tokens generated before EOS or stop_token_ids may end it.")
    stop_token_ids: Optional[TokenIds] = None
    ignore_eos: bool = False

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(param, message) for a field set to something this server cannot do."""
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED_EXTRAS:
            value = extra.get(name)
            # Same type too: `true` is not a best_of of 1, nor `1` a use_beam_search of False.
            if value is not None and not any(value == ok and type(value) is type(ok) for ok in neutral):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                return name, f"{name}={shown} is not supported by this server"
        return None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: four lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
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
