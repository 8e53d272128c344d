"""Bad input gets a 4xx with one OpenAI-style body, and the replica keeps serving."""

import httpx
import openai
import pytest
from tokenizers import Tokenizer


def post(serve_app, **kwargs):
    return httpx.post(f"{serve_app.base_url}/v1/completions", timeout=60, **kwargs)


def assert_error(r, status, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    if contains is not None:
        assert contains in err["message"]
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "hi", "n": 1.5}, "n"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": 42}, None),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),  # max_logprobs is 20
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": [5, 600]}, "prompt"),  # the tiny vocabulary is 600 tokens
        ({"prompt": [[5], []]}, "prompt"),
        ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"600": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "hi", "min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ({"prompt": "hi", "stop_token_ids": [600]}, "stop_token_ids"),
        ({"prompt": "hi", "min_p": 1.5}, "min_p"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "suffix": "!"}, "suffix"),
    ],
)
def test_invalid_fields_are_400(serve_app, body, param):
    err = assert_error(post(serve_app, json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_nan_is_400(serve_app):
    assert_error(post(serve_app, content=b'{"prompt": "hi", "temperature": NaN}'), 400)


def test_malformed_json_is_400(serve_app):
    assert_error(post(serve_app, content=b'{"prompt": "hi"'), 400, contains="not valid JSON")


def test_context_overflow_names_both_numbers(serve_app):
    n_prompt = len(Tokenizer.from_file(f"{serve_app.model_dir}/tokenizer.json").encode("Hello").ids)
    err = assert_error(post(serve_app, json={"prompt": "Hello", "max_tokens": 1000}), 400, param="max_tokens")
    assert "256" in err["message"] and str(n_prompt + 1000) in err["message"]


def test_unknown_model_is_404(serve_app):
    err = assert_error(post(serve_app, json={"prompt": "hi", "model": "gpt-4"}), 404, param="model")
    assert "gpt-4" in err["message"]


def test_openai_client_raises_typed_errors(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=serve_app.model_name, prompt="hi", max_tokens=-1)


def test_unknown_route_uses_the_error_shape(serve_app):
    assert_error(httpx.get(f"{serve_app.base_url}/v1/nothing", timeout=30), 404)


def test_service_still_answers_after_bad_input(serve_app):
    for body in (b"\xff\xfe not utf8", b"[" * 5000, b'{"prompt": ' + b'"' + b"a" * 200_000 + b'"}'):
        r = post(serve_app, content=body)
        assert 400 <= r.status_code < 500, r.text
    r = post(serve_app, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
