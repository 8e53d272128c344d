"""lm-evaluation-harness through the live app equals lm-eval's own `hf` model on the same weights.

lm-eval's `local-completions` model scores each choice of a multiple-choice task by sending
the token ids of context + continuation with echo, max_tokens=1 and logprobs=1, then sums
`token_logprobs[ctxlen:-1]` and checks each against the best of `top_logprobs`: the path
most harnesses and leaderboards take through an OpenAI-compatible server. Its `hf` model
computes the same numbers from GPT2LMHeadModel's logits in one process. Same task, same
tokenizer, so every loglikelihood, every is_greedy and the accuracy must agree.

Offline: the task and its data live in tests/data/lm_eval/; nothing comes from the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

TASK_DIR = Path(__file__).parent / "data" / "lm_eval"
TASK = "serve_tp_tiny_mc"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
LOGLIKELIHOOD_TOLERANCE = 1e-3  # fp32 TP=2 against fp32 unsharded, summed over a continuation


@pytest.fixture(scope="module")
def lm_eval_offline(tmp_path_factory):
    """lm_eval, with the Hub switched off and a private datasets cache, for this module only."""
    saved = {key: os.environ.get(key) for key in [*OFFLINE, "HF_DATASETS_CACHE"]}
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets")))
    import datasets
    import lm_eval

    datasets.config.HF_DATASETS_OFFLINE = True  # read at import; datasets may have been imported before
    yield lm_eval
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def task_config() -> dict:
    """The task's YAML with its data file made absolute, so pytest may run from anywhere."""
    config = yaml.safe_load((TASK_DIR / "tiny_mc.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(TASK_DIR / "tiny_mc.jsonl")
    return config


def evaluate(lm_eval, model: str, model_args: dict) -> tuple[float, dict[int, list[tuple[float, bool]]]]:
    """(accuracy, each doc's (loglikelihood, is_greedy) per choice)."""
    from lm_eval.tasks import TaskManager

    # Only our task: indexing lm-eval's thousands of built-in tasks takes about a minute here.
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task_config()],
                                      task_manager=tasks, log_samples=True, bootstrap_iters=0, random_seed=0)
    per_doc = {
        sample["doc_id"]: [(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]]
        for sample in results["samples"][TASK]
    }
    return results["results"][TASK]["acc,none"], per_doc


def test_local_completions_scores_equal_hf(lm_eval_offline, serve_app):
    served_acc, served = evaluate(lm_eval_offline, "local-completions", {
        "model": serve_app.model_name,
        "base_url": f"{serve_app.base_url}/v1/completions",
        "tokenizer": serve_app.model_dir,
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "batch_size": 4,  # prompts per request: lists of token-id lists, matched back by `index`
        "num_concurrent": 2,
        "max_retries": 1,
        "max_length": 256,
        "timeout": 120,
    })
    hf_acc, reference = evaluate(lm_eval_offline, "hf", {
        "pretrained": serve_app.model_dir, "dtype": "float32", "device": "cpu", "batch_size": 4,
    })
    assert len(served) == len(reference) == 20
    for doc_id, choices in reference.items():
        assert len(served[doc_id]) == len(choices)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(served[doc_id], choices):
            assert abs(ll - ref_ll) < LOGLIKELIHOOD_TOLERANCE, (doc_id, ll, ref_ll)
            assert greedy == ref_greedy, doc_id
    assert served_acc == hf_acc
    # Control: the choices' loglikelihoods differ by far more than the tolerance, so a server
    # that answered with the wrong choice's (or prompt's) numbers could not pass.
    gaps = [abs(a[0] - b[0]) for choices in reference.values() for a, b in zip(choices, choices[1:])]
    assert min(gaps) > 10 * LOGLIKELIHOOD_TOLERANCE


def test_lm_eval_reads_our_loglikelihood_responses(lm_eval_offline, tiny_model_dir):
    """lm-eval's own payload and parser around our response shaping, with a scripted engine
    (no Ray): each prompt token's logprob and whether it was the top one are known, so the
    sums and is_greedy flags lm-eval derives from our JSON are too."""
    import asyncio

    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from tokenizers import Tokenizer

    from serve_tp.api.protocol import CompletionRequest
    from serve_tp.api.serving import CompletionService
    from serve_tp.config import ServeTPConfig
    from serve_tp.messages import SequenceOutput, TokenLogprob

    def logprob(position: int, token_id: int) -> TokenLogprob:
        greedy = position != 3  # the 4th token was not the model's top choice; every other was
        best = token_id if greedy else (token_id + 1) % 600
        value = -0.1 * (position + 1)
        return TokenLogprob(token_id, value, ((best, value if greedy else value + 0.05),))

    class ScriptedGroup:
        async def generate(self, request):
            ids = request.prompt_ids
            scored = [None] + [logprob(t, ids[t]) for t in range(1, len(ids))]
            yield SequenceOutput([7], [logprob(len(ids), 7)], scored, finish_reason="length")

    tokenizer = Tokenizer.from_file(f"{tiny_model_dir}/tokenizer.json")
    service = CompletionService(ServeTPConfig(model=tiny_model_dir, device="cpu"), tokenizer, 256, ScriptedGroup())
    lm = LocalCompletionsAPI(model="tiny-gpt2", base_url="http://unused/v1/completions", tokenizer=tiny_model_dir,
                             tokenizer_backend="huggingface", tokenized_requests=True)
    prompts = [tokenizer.encode(text).ids for text in ("Question: Bees make Answer: honey", "Snow is white",
                                                       "The capital of France is Paris")]
    ctxlens = [4, 2, 5]
    payload = lm._create_payload(prompts, generate=False)
    req = CompletionRequest.model_validate({**payload, "model": Path(tiny_model_dir).name})
    response = asyncio.run(service.complete(req, service.plan(req)))
    parsed = lm.parse_logprobs(outputs=response, tokens=prompts, ctxlens=ctxlens)
    assert {greedy for _, greedy in parsed} == {True, False}  # both kinds of continuation are here
    for ids, ctxlen, (total, greedy) in zip(prompts, ctxlens, parsed):
        continuation = range(ctxlen, len(ids))
        assert total == pytest.approx(sum(logprob(t, ids[t]).logprob for t in continuation))
        assert greedy == (3 not in continuation)
