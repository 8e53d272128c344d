"""SERVE_TP_API_KEY: every route but /health wants the bearer key, as on Anyscale."""

import httpx
import openai
import pytest
from ray import serve

from tests.conftest import deploy

KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def secure_url(serve_app, monkeypatch_module):
    monkeypatch_module.setenv("SERVE_TP_API_KEY", KEY)
    url = deploy("secure", "/secure", model=serve_app.model_dir, tensor_parallel_size=2, device="cpu",
                 replica_cpus=0.5, cpus_per_rank=0.5)
    yield url
    serve.delete("secure")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_key_is_401(secure_url, headers):
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/infer?text=hi")):
        r = httpx.request(method, f"{secure_url}{path}", headers=headers, json={"prompt": "hi"}, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"


def test_right_key_is_served_and_health_is_open(secure_url, serve_app):
    client = openai.OpenAI(base_url=f"{secure_url}/v1", api_key=KEY, max_retries=0)
    res = client.completions.create(model=serve_app.model_name, prompt="Hello", max_tokens=4, temperature=0)
    assert res.usage.completion_tokens >= 1
    assert httpx.get(f"{secure_url}/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secure_url}/v1", api_key="nope", max_retries=0).models.list()


def test_the_unsecured_app_needs_no_key(serve_app):
    r = httpx.get(f"{serve_app.base_url}/v1/models", timeout=30)
    assert r.status_code == 200
