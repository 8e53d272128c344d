"""Every sampling field a request can send: a bad value is a 400 naming it, a good one
reaches SamplingParams exactly (no HTTP; the live app's 400s are in test_api_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from serve_tp.api.errors import APIError, from_validation_error
from serve_tp.api.protocol import CompletionRequest
from serve_tp.api.serving import CompletionService
from serve_tp.config import ServeTPConfig
from serve_tp.messages import SamplingParams

VOCAB = 600  # the tiny tokenizer's size, with its one added token


@pytest.fixture(scope="module")
def service(tiny_model_dir) -> CompletionService:
    config = ServeTPConfig(model=tiny_model_dir, device="cpu", tensor_parallel_size=2, max_logprobs=5)
    tokenizer = Tokenizer.from_file(str(Path(tiny_model_dir) / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB
    return CompletionService(config, tokenizer, 256, group=None)


def planned(service, body: dict):
    """The jobs, or the APIError the route would answer with, as the route parses the body."""
    try:
        return service.plan(CompletionRequest.model_validate_json(json.dumps(body)))
    except ValidationError as exc:
        return from_validation_error(exc)
    except APIError as err:
        return err


BAD = [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [VOCAB]}, "prompt"),
    ({"prompt": [[1, 2], [3, VOCAB + 7]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "logprobs": "1"}, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "presence_penalty": -2.01}, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "hi", "frequency_penalty": "1"}, "frequency_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "repetition_penalty": -1.0}, "repetition_penalty"),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {" 5": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"1": -101}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"1": "5"}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "hi", "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "hi", "min_tokens": 17}, "min_tokens"),  # default max_tokens is 16
    ({"prompt": "hi", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [-3]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": 5}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": ["5"]}, "stop_token_ids"),
    ({"prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"prompt": "hi", "min_p": -0.1}, "min_p"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "best_of": True}, "best_of"),
    ({"prompt": "hi", "suffix": "tail"}, "suffix"),
    ({"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ({"prompt": "hi", "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt": "hi", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"prompt": "hi", "skip_special_tokens": False}, "skip_special_tokens"),
    ({"prompt": "hi", "allowed_token_ids": [1, 2]}, "allowed_token_ids"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[f"{p}={json.dumps(b)[:60]}" for b, p in BAD])
def test_bad_value_is_a_400_naming_the_field(service, body, param):
    err = planned(service, body)
    assert isinstance(err, APIError), f"accepted: {err}"
    assert err.status == 400 and err.param == param, (err.param, err.message)
    assert param in err.message or err.code == "invalid_value"


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "best_of": 1, "suffix": "", "use_beam_search": False, "skip_special_tokens": True},
    {"prompt": "hi", "max_tokens": 0, "echo": True},
    {"prompt": "hi", "logprobs": 5, "min_tokens": 16, "logit_bias": {}, "stop_token_ids": []},
    {"prompt": [0, 1, VOCAB - 1]},
    {"prompt": [[5], [6, 7]], "n": 2},
])
def test_neutral_and_edge_values_are_accepted(service, body):
    jobs = planned(service, body)
    assert isinstance(jobs, list), jobs.message


def test_every_field_reaches_sampling_params(service):
    body = {
        "prompt": [[5, 6, 7], [8]], "n": 2, "echo": True, "logprobs": 3, "max_tokens": 9, "min_tokens": 2,
        "temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.05, "seed": 2**64 - 1,
        "presence_penalty": 0.5, "frequency_penalty": -1.5, "repetition_penalty": 1.3,
        "logit_bias": {"12": 100, "3": -100, "007": 2.5}, "stop_token_ids": [9, 4, 9], "ignore_eos": True,
    }
    jobs = planned(service, body)
    assert [job.index for job in jobs] == [0, 1, 2, 3]
    assert [job.prompt_ids for job in jobs] == [[5, 6, 7], [5, 6, 7], [8], [8]]
    assert jobs[2].prompt_text == service.tokenizer.decode([8], skip_special_tokens=False)
    assert all(job.echo for job in jobs)
    common = dict(max_tokens=9, min_tokens=2, temperature=0.7, top_p=0.9, top_k=0, min_p=0.05,
                  presence_penalty=0.5, frequency_penalty=-1.5, repetition_penalty=1.3,
                  logit_bias=((3, -100.0), (7, 2.5), (12, 100.0)), stop_token_ids=(4, 9), ignore_eos=True,
                  logprobs=3, prompt_logprobs=3)
    seeds = [2**64 - 1, 0, 2**64 - 1, 0]  # seed + choice, wrapped to 64 bits
    assert [job.params for job in jobs] == [SamplingParams(seed=s, **common) for s in seeds]


def test_defaults_ask_the_engine_for_nothing_extra(service):
    (job,) = planned(service, {"prompt": "hi"})
    assert job.params == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0)
    assert job.params.logprobs is None and job.params.prompt_logprobs is None and not job.params.penalised


def test_logprobs_without_echo_leave_the_prompt_unscored(service):
    (job,) = planned(service, {"prompt": "hi", "logprobs": 0})
    assert job.params.logprobs == 0 and job.params.prompt_logprobs is None


def test_token_id_prompt_counts_against_the_context(service):
    err = planned(service, {"prompt": [1] * 250, "max_tokens": 7})
    assert err.status == 400 and err.param == "max_tokens" and "257" in err.message
    # scoring (max_tokens 0) still needs the slot after the prompt: 255 of a 256-token context
    assert isinstance(planned(service, {"prompt": [1] * 255, "max_tokens": 0, "echo": True}), list)
    full = planned(service, {"prompt": [1] * 256, "max_tokens": 0, "echo": True})
    assert full.status == 400 and full.code == "context_length_exceeded" and "255" in full.message


def test_long_unsupported_values_are_shortened_in_the_message(service):
    err = planned(service, {"prompt": "hi", "suffix": "x" * 10_000})
    assert err.param == "suffix" and len(err.message) < 120
