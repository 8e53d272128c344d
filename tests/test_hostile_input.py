"""Hostile input (issue 5): whatever a client sends, the answer is a 4xx in the one error
shape or a normal completion, never a 5xx, a crash or a hang, and the replica keeps serving.

Three layers: hypothesis properties of the request model and `CompletionService.plan` (no
HTTP); schemathesis fuzzing of the live app from its own OpenAPI document; hand-made raw
HTTP bodies that no schema-driven generator would produce.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from serve_tp.config import ServeTPConfig
from serve_tp.api.errors import APIError, error_response, from_validation_error
from serve_tp.model.source import context_length, read_model_config
from serve_tp.api.protocol import CompletionRequest
from serve_tp.api.serving import CompletionService

ERROR_KEYS = {"message", "type", "param", "code"}
FIELDS = list(CompletionRequest.model_fields) + ["best_of", "suffix", "logit_bias"]

# ---------------------------------------------------------------- strategies

# JSON numbers past every native width, and past float range once parsed as a float.
HUGE_INTS = st.sampled_from([2**31, 2**53 + 1, 2**63, -(2**63) - 1, 2**64,
                             10**100, -(10**100), 10**4000])
# Giant strings built by repetition: hypothesis would take ages to draw 200k characters one by one.
PIECES = ["a", " ", "é", "\u202e", "\U0001f600", "\x00", "<|endoftext|>", "\ufeff"]
GIANT_TEXT = st.builds(lambda piece, times: piece * times, st.sampled_from(PIECES), st.integers(1_000, 120_000))
# Lone surrogates, controls, noncharacters, private use: everything `characters` can make.
ODD_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)
TEXT = st.text(max_size=40) | ODD_TEXT | GIANT_TEXT
SCALARS = (st.none() | st.booleans() | st.integers() | HUGE_INTS
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5),
                    max_leaves=20)


@st.composite
def json_bytes(draw, value_strategy=JSON):
    """A JSON document as a client could send it: NaN/Infinity literals (Python's json
    writes them), lone surrogates as \\u escapes or as CESU bytes (invalid UTF-8)."""
    value = draw(value_strategy)
    if draw(st.booleans()):
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def one_field(name):
    return st.fixed_dictionaries({"prompt": st.just("Hello"), name: JSON})


# Bodies that mostly validate, so `plan` sees many valid requests, with values at the edges:
# each field is in range three times out of four, hostile the fourth.
def mostly(valid, hostile):
    return st.sampled_from([valid, valid, valid, hostile]).flatmap(lambda strategy: strategy)


PROMPT = mostly(st.text(min_size=1, max_size=60),
                GIANT_TEXT | st.sampled_from(["", " ", "<|endoftext|>", "\x00"]))
PLAUSIBLE = st.fixed_dictionaries(
    {"prompt": mostly(PROMPT, st.lists(PROMPT, max_size=20))},
    optional={
        "model": mostly(st.just("tiny-gpt2"), st.sampled_from(["gpt-4", ""]) | st.text(max_size=10)),
        "echo": st.booleans(),
        "frequency_penalty": mostly(st.sampled_from([None, 0, 0.0]), st.floats(-2, 2)),
        "presence_penalty": mostly(st.sampled_from([None, 0, -0.0]), st.floats(-2, 2)),
        "logprobs": mostly(st.none(), st.integers(0, 5)),
        "max_tokens": mostly(st.none() | st.integers(1, 40), st.integers(-2, 300) | HUGE_INTS),
        "n": mostly(st.integers(1, 8), st.integers(-1, 20) | HUGE_INTS),
        "seed": st.none() | st.integers(-(2**63) - 1, 2**64) | st.sampled_from([2**64 - 1, -(2**63)]),
        "stop": mostly(st.none() | st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=4),
                       TEXT | st.lists(st.text(max_size=5), max_size=8)),
        "stream": st.booleans(),
        "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
        # Float edges (subnormals, -0.0, values whose reciprocal overflows float32) are the point.
        "temperature": st.none() | st.floats(-0.5, 2.5, allow_subnormal=True)
        | st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-40, 1e-38, 1e-20, 1e-6, 2.0]),
        "top_p": st.none() | st.floats(-0.1, 1.1) | st.sampled_from([5e-324, 1e-300, 1.0]),
        "user": st.none() | st.text(max_size=10),
        "top_k": st.none() | st.integers(-2, 1_000_001),
        "ignore_eos": st.booleans(),
        "best_of": mostly(st.sampled_from([None, 1]), st.integers(0, 3)),
    },
)

# ---------------------------------------------------------------- 1. properties, no HTTP

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])


def parse(body: bytes):
    """The request, or the APIError the route would raise; anything else escapes the test."""
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        return exc


def assert_renders_as_4xx(err: APIError) -> None:
    """The error the handlers would send: a 4xx whose body renders (UTF-8) in the one shape."""
    assert 400 <= err.status < 500, (err.status, err.message)
    rendered = json.loads(error_response(err).body)
    assert set(rendered) == {"error"} and set(rendered["error"]) == ERROR_KEYS
    assert rendered["error"]["message"]


@pytest.fixture(scope="module")
def service(tiny_model_dir) -> CompletionService:
    from tokenizers import Tokenizer

    config = ServeTPConfig(model=tiny_model_dir, device="cpu", tensor_parallel_size=2)
    tokenizer = Tokenizer.from_file(str(Path(tiny_model_dir) / "tokenizer.json"))
    ctx = context_length(read_model_config(Path(tiny_model_dir)))
    return CompletionService(config, tokenizer, ctx, group=None)  # plan never touches the group


@PROPERTY
@given(body=json_bytes())
def test_any_json_document_validates_or_is_a_400(body):
    result = parse(body)
    if isinstance(result, ValidationError):
        event("rejected")
        err = from_validation_error(result)
        assert err.status == 400
        assert_renders_as_4xx(err)
    else:
        event("accepted")


@PROPERTY
@given(data=st.data(), name=st.sampled_from(FIELDS))
def test_any_value_in_any_field_validates_or_is_a_400(data, name):
    result = parse(data.draw(json_bytes(one_field(name))))
    if isinstance(result, ValidationError):
        err = from_validation_error(result)
        assert err.status == 400
        assert_renders_as_4xx(err)
        if err.code == "invalid_value":  # a field problem names the field
            assert err.param is not None and err.param.split(".")[0] in (name, "prompt")


@PROPERTY
@given(body=json_bytes(PLAUSIBLE))
def test_plan_returns_sound_jobs_or_a_4xx(service, body):
    """Valid requests: jobs the engine can run, or an APIError with a 4xx — never another exception."""
    req = parse(body)
    if isinstance(req, ValidationError):
        event("invalid")
        assert from_validation_error(req).status == 400
        return
    try:
        jobs = service.plan(req)
    except APIError as err:
        event(f"plan rejected: {err.param}")
        assert_renders_as_4xx(err)
        return
    event("planned")
    cfg = service.config
    assert len(jobs) == len(req.prompts()) * req.n <= cfg.max_prompts_per_request * cfg.max_n
    assert sorted(j.index for j in jobs) == list(range(len(jobs)))
    for job in jobs:
        p = job.params
        assert job.prompt_ids and len(job.prompt_ids) + p.max_tokens <= service.context_length
        assert p.max_tokens >= 1 and len(job.stops) <= cfg.max_stop_sequences
        assert p.seed is None or 0 <= p.seed < 2**64
        assert math.isfinite(p.temperature) and 0 <= p.temperature <= 2
        assert 0 < p.top_p <= 1


@PROPERTY
@given(body=json_bytes(PLAUSIBLE), scale=st.sampled_from([1.0, 10.0, 100.0]))
def test_planned_params_sample_a_token(service, body, scale):
    """What plan lets through, rank 0's sampler must survive: a sampling error there kills
    the engine loop and with it the whole TP group, for every client."""
    import torch

    from serve_tp.engine.sampling import make_generator, sample_tokens

    req = parse(body)
    if isinstance(req, ValidationError):
        return
    try:
        jobs = service.plan(req)
    except APIError:
        return
    vocab = service.tokenizer.get_vocab_size()
    logits = torch.randn(len(jobs), vocab, generator=torch.Generator().manual_seed(0)) * scale
    params = [job.params for job in jobs]
    tokens = sample_tokens(logits, params, [make_generator(p) for p in params])
    assert all(0 <= t < vocab for t in tokens)


# ---------------------------------------------------------------- 2. schemathesis against the live app


def served_openapi(serve_app) -> dict:
    return httpx.get(f"{serve_app.base_url}/openapi.json", timeout=30).raise_for_status().json()


def unresolved_refs(node, doc) -> list[str]:
    """Every local `$ref` in `node` that names nothing in the OpenAPI document `doc`."""
    found = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target = doc
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            if target is None:
                found.append(ref)
        for value in node.values():
            found += unresolved_refs(value, doc)
    elif isinstance(node, list):
        for value in node:
            found += unresolved_refs(value, doc)
    return found


def test_openapi_document_refs_resolve(serve_app):
    doc = served_openapi(serve_app)
    assert unresolved_refs(doc, doc) == []


@pytest.fixture(scope="module")
def api_schema(serve_app):
    """The app's own OpenAPI document, as served."""
    doc = served_openapi(serve_app)
    assert unresolved_refs(doc, doc) == []
    return schemathesis.openapi.from_dict(doc)


# Examples per operation and mode. Every accepted completion generates tokens on 2 shared CPU
# cores, so these counts bound the runtime (about 160 requests in all). Routes without
# parameters have a single positive case and no negative one.
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
OPERATIONS = [("POST", "/v1/completions", POSITIVE, 60), ("POST", "/v1/completions", NEGATIVE, 60),
              ("GET", "/infer", POSITIVE, 20), ("GET", "/infer", NEGATIVE, 20),
              ("GET", "/v1/models", POSITIVE, 1), ("GET", "/health", POSITIVE, 1)]


# schemathesis' own `from_fixture(...).parametrize()` sets `node._nodeid`, which pytest 9
# no longer has, so its strategies are driven by a plain hypothesis `@given` here.
@pytest.mark.parametrize("method, path, mode, examples", OPERATIONS,
                         ids=[f"{m} {p} {g.value}" for m, p, g, _ in OPERATIONS])
def test_schemathesis_finds_no_server_error(api_schema, serve_app, method, path, mode, examples):
    """Schema-driven requests, valid (positive) and schema-violating (negative): no 5xx,
    and every error in the one shape."""
    operation = api_schema[path][method]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        sent.append(case)
        response = case.call(base_url=serve_app.base_url, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == ERROR_KEYS, response.text

    sent = []
    fuzz()
    assert len(sent) >= examples  # the schema really produced requests
    if method == "POST":
        assert all(isinstance(case.body, (dict, list, str, bytes, int, float)) for case in sent), "no body"


# ---------------------------------------------------------------- 3. raw hostile HTTP bodies


def post(serve_app, **kwargs) -> httpx.Response:
    return httpx.post(f"{serve_app.base_url}/v1/completions", timeout=60, **kwargs)


def assert_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


HOSTILE = {
    # name: (body bytes, extra headers, status, param)
    "invalid_utf8": (b'{"prompt": "\xff\xfe\xc3"}', {}, 400, None),
    "cesu_surrogate": ('{"prompt": "\ud800"}'.encode("utf-8", "surrogatepass"), {}, 400, None),
    "escaped_lone_surrogate": (b'{"prompt": "a\\udc00"}', {}, 400, None),
    "nested_100k": (b"[" * 100_000, {}, 400, None),
    "nested_in_field": (b'{"prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, None),
    "body_2mib": (json.dumps({"prompt": "a" * (2 << 20)}).encode(), {}, 413, None),
    "max_tokens_1e100": (json.dumps({"prompt": "hi", "max_tokens": 10**100}).encode(), {}, 400, "max_tokens"),
    "max_tokens_4000_digits": (b'{"prompt": "hi", "max_tokens": ' + b"9" * 4000 + b"}", {}, 400, None),
    "nan_temperature": (b'{"prompt": "hi", "temperature": NaN}', {}, 400, None),
    "infinity_top_p": (b'{"prompt": "hi", "top_p": Infinity}', {}, 400, None),
    "minus_infinity_penalty": (b'{"prompt": "hi", "presence_penalty": -Infinity}', {}, 400, None),
    "float_1e999": (b'{"prompt": "hi", "temperature": 1e999}', {}, 400, "temperature"),
    "form_encoded": (b"prompt=hi&max_tokens=3", {"content-type": "application/x-www-form-urlencoded"},
                     415, None),
    "prompt_200k_chars": (json.dumps({"prompt": "a" * 200_000}).encode(), {}, 400, "prompt"),
    "prompt_list_10k": (json.dumps({"prompt": ["hi"] * 10_000}).encode(), {}, 400, "prompt"),
    "stop_1000": (json.dumps({"prompt": "hi", "stop": ["x"] * 1000}).encode(), {}, 400, "stop"),
    "n_1e9": (json.dumps({"prompt": "hi", "n": 10**9}).encode(), {}, 400, "n"),
    "seed_2_64": (json.dumps({"prompt": "hi", "seed": 2**64}).encode(), {}, 400, "seed"),
    "body_is_a_list": (b'["prompt", "hi"]', {}, 400, None),
    "body_is_null": (b"null", {}, 400, None),
    "empty_body": (b"", {}, 400, None),
    "bom_prefixed": (b'\xef\xbb\xbf{"prompt": "hi"}', {}, 400, None),
    "duplicate_keys_last_invalid": (b'{"prompt": "hi", "n": 1, "n": 0}', {}, 400, "n"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_body_is_a_4xx_in_the_error_shape(serve_app, name):
    body, headers, status, param = HOSTILE[name]
    assert_error(post(serve_app, content=body, headers=headers), status, param)


def test_json_sent_as_text_plain_is_415(serve_app):
    r = post(serve_app, content=b'{"prompt": "hi", "max_tokens": 1}', headers={"content-type": "text/plain"})
    assert_error(r, 415)


@pytest.mark.parametrize("field, value", [("temperature", 5e-324), ("temperature", 1e-40),
                                          ("temperature", 1e-38), ("top_p", 5e-324), ("top_p", 1e-300)])
def test_vanishing_sampling_params_are_greedy_not_fatal(serve_app, field, value):
    """logits / 1e-40 overflow float32 to inf; a top_p of 1e-300 is 0 in float32 and masks every
    token. Softmax then gave NaN and torch.multinomial raised inside rank 0's engine loop,
    killing the TP group for every later request (503 until Serve replaced the replica).
    Both mean "only the top token", so the text is the greedy one."""
    greedy = post(serve_app, json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    r = post(serve_app, json={"prompt": "Hello", "max_tokens": 4, "temperature": 1.0, field: value})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=json_bytes(PLAUSIBLE))
def test_edge_valued_requests_over_http_are_200_or_4xx(serve_app, body):
    """The bodies `plan` was checked on, now through the live app and the TP group."""
    r = post(serve_app, content=body)
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        assert set(r.json()["error"]) == ERROR_KEYS


@pytest.mark.parametrize("body", [
    {"prompt": "\x00\u202e\U0001f600\ufffe<|endoftext|>", "max_tokens": 3, "echo": True},
    {"prompt": "hi", "max_tokens": 3, "seed": 2**64 - 1, "n": 8, "temperature": 2.0, "top_k": 1_000_000},
    {"prompt": "hi", "max_tokens": 3, "seed": -(2**63), "top_p": 1e-45, "temperature": 1e-5},
    {"prompt": "hi", "max_tokens": 3, "stop": ["", "\x00"], "unknown_field": {"deep": [[[]]]}},
])
def test_odd_but_valid_requests_complete(serve_app, body):
    r = post(serve_app, json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == body.get("n", 1)


def test_replica_keeps_serving_after_hostile_input(serve_app):
    """Every hostile body again, back to back, then the same greedy request as before
    gives the same text, and every rank reports healthy."""
    normal = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    before = post(serve_app, json=normal)
    assert before.status_code == 200, before.text
    for name, (body, headers, status, _) in HOSTILE.items():
        assert post(serve_app, content=body, headers=headers).status_code == status, name
    for fatal_before in ({"temperature": 1e-40}, {"top_p": 1e-300}):
        assert post(serve_app, json={"prompt": "Hello", "max_tokens": 4, **fatal_before}).status_code == 200
    after = post(serve_app, json=normal)
    assert after.status_code == 200, after.text
    assert after.json()["choices"] == before.json()["choices"]
    health = httpx.get(f"{serve_app.base_url}/health", timeout=30)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok"
