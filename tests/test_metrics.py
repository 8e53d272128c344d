"""Prometheus metrics: the app's counters and histograms reach Ray's metrics endpoint with their tags.

Ray exports custom metrics from each node's metrics agent every few seconds, so every check
polls. Counters are compared with a scrape taken before this module's traffic, so requests
of other test modules in the session cannot make them pass.
"""

import re
import time
from pathlib import Path

import httpx
import pytest

PROMPT = "Metrics count tokens"
POLL_S = 90

_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> tuple[str, list[tuple[str, dict, float]]]:
    text = httpx.get(url, timeout=10).text
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return text, samples


def total(samples, name: str, **tags) -> float:
    """Sum over every series of `name` whose labels include `tags` (all workers, all replicas)."""
    return sum(v for n, labels, v in samples if n == name and all(labels.get(k) == t for k, t in tags.items()))


@pytest.fixture(scope="module")
def metrics_url(serve_app):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 1, "the test cluster is one node; its agent exports every worker's metrics"
    return f"http://127.0.0.1:{nodes[0]['MetricsExportPort']}/metrics"


@pytest.fixture(scope="module")
def traffic(serve_app, metrics_url):
    """Requests of known sizes and statuses; returns (scrape before them, what was sent)."""
    from tokenizers import Tokenizer

    _, before = scrape(metrics_url)
    url, model = serve_app.base_url, serve_app.model_name
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 7}, timeout=60)
    assert r.status_code == 200, r.text
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 5, "stream": True},
                      timeout=60) as s:
        assert s.status_code == 200
        s.read()
    assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 0}, timeout=60).status_code == 400
    assert httpx.post(f"{url}/v1/completions", json={**body, "model": "nope"}, timeout=60).status_code == 404
    assert httpx.get(f"{url}/no/such/route", timeout=60).status_code == 404
    assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 200
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200
    prompt_tokens = len(Tokenizer.from_file(str(Path(serve_app.model_dir) / "tokenizer.json")).encode(PROMPT).ids)
    # Rank 0 steps at least once per token of the longest sequence (1 admit, then decodes).
    return before, {"completions": 2, "completion_tokens": 7 + 5, "prompt_tokens": 2 * prompt_tokens,
                    "engine_steps": 7}


@pytest.fixture(scope="module")
def exported(traffic, metrics_url, serve_app):
    """Scrape until this module's traffic and a health check show up (or POLL_S pass)."""
    before, sent = traffic
    model = serve_app.model_name

    def grown(samples, name, **tags):
        return total(samples, name, **tags) - total(before, name, **tags)

    deadline = time.monotonic() + POLL_S
    while True:
        text, samples = scrape(metrics_url)
        # The last record of each exporting process (replica, rank 0), and a health check.
        done = (
            grown(samples, "ray_serve_tp_completion_tokens_total", model=model) >= sent["completion_tokens"]
            and grown(samples, "ray_serve_tp_requests_total", route="/health", status="200") >= 1  # sent last
            and grown(samples, "ray_serve_tp_engine_batch_size_count", model=model) >= sent["engine_steps"]
            and total(samples, "ray_serve_tp_rank_healthy", model=model, rank="1") >= 1
        )
        if done or time.monotonic() > deadline:
            return text, samples, before, sent
        time.sleep(2)


def test_requests_are_counted_by_route_and_status(exported, serve_app):
    _, samples, before, sent = exported
    model = serve_app.model_name

    def grown(**tags):
        return total(samples, "ray_serve_tp_requests_total", model=model, **tags) - \
            total(before, "ray_serve_tp_requests_total", model=model, **tags)

    assert grown(route="/v1/completions", status="200") >= sent["completions"]
    assert grown(route="/v1/completions", status="400") >= 1  # an APIError, counted with its status
    assert grown(route="/v1/completions", status="404") >= 1  # unknown model
    assert grown(route="other", status="404") >= 1  # unknown paths share one series
    assert grown(route="/v1/models", status="200") >= 1
    assert grown(route="/health", status="200") >= 1
    routes = {labels["route"] for n, labels, _ in samples if n == "ray_serve_tp_requests_total"}
    assert routes <= {"/v1/completions", "/v1/models", "/infer", "/health", "other"}
    latency = total(samples, "ray_serve_tp_request_latency_seconds_count", model=model, route="/v1/completions")
    assert latency - total(before, "ray_serve_tp_request_latency_seconds_count", model=model,
                           route="/v1/completions") >= sent["completions"] + 2


def test_tokens_are_counted_as_usage_counts_them(exported, serve_app):
    _, samples, before, sent = exported
    model = serve_app.model_name
    for name, key in (("ray_serve_tp_completion_tokens_total", "completion_tokens"),
                      ("ray_serve_tp_prompt_tokens_total", "prompt_tokens")):
        assert total(samples, name, model=model) - total(before, name, model=model) >= sent[key], name


def test_token_latencies_are_histograms_in_seconds(exported, serve_app):
    _, samples, before, sent = exported
    model = serve_app.model_name
    # Every sequence has a first token; one whose tokens all arrive in one item (coalesced
    # while the replica was busy) has no gap to time, so TPOT may count fewer.
    for name, least in (("ray_serve_tp_time_to_first_token_seconds", sent["completions"]),
                        ("ray_serve_tp_time_per_output_token_seconds", 1)):
        count = total(samples, f"{name}_count", model=model) - total(before, f"{name}_count", model=model)
        assert count >= least, name
        buckets = {labels["le"] for n, labels, _ in samples if n == f"{name}_bucket"}
        assert {"1.0", "+Inf"} <= buckets and len(buckets) > 5, (name, buckets)
        # Seconds, not milliseconds: on CPU the tiny model's tokens take well under 60 s each.
        within = total(samples, f"{name}_bucket", model=model, le="60.0" if "60.0" in buckets else "2.5")
        assert within == total(samples, f"{name}_bucket", model=model, le="+Inf") > 0, name


def test_engine_records_batch_size_and_queue_on_rank_0(exported, serve_app):
    _, samples, before, sent = exported
    model = serve_app.model_name
    steps = total(samples, "ray_serve_tp_engine_batch_size_count", model=model) - \
        total(before, "ray_serve_tp_engine_batch_size_count", model=model)
    assert steps >= sent["engine_steps"]
    waiting = [v for n, labels, v in samples if n == "ray_serve_tp_engine_waiting_sequences"
               and labels.get("model") == model]
    running = [v for n, labels, v in samples if n == "ray_serve_tp_engine_running_sequences"
               and labels.get("model") == model]
    assert waiting and running and all(v >= 0 for v in waiting + running)


def test_rank_health_is_one_per_healthy_rank(exported, serve_app):
    _, samples, _, _ = exported
    replicas: dict[str, dict[str, float]] = {}
    for n, labels, v in samples:
        if n == "ray_serve_tp_rank_healthy" and labels.get("model") == serve_app.model_name:
            replicas.setdefault(labels["replica"], {})[labels["rank"]] = v
    assert all(v in (0, 1) for ranks in replicas.values() for v in ranks.values()), replicas
    # Other modules may have broken replicas of the same model on purpose; serve_app's is whole.
    assert {"0": 1, "1": 1} in replicas.values(), replicas


def test_no_prompt_text_in_metrics(exported):
    text, _, _, _ = exported
    assert PROMPT not in text
