"""The tutorial baseline: anyscale/examples `serve_tensor_parallel`, driven the tutorial's way.

One `InferenceDeployment` replica owns a TP group of `InferenceWorker` rank actors. Every
request makes every rank call Hugging Face `model.generate(...)` on its shard, and rank 0's
text is returned. That is the design serve_tp is measured against, so each rank starts as
serve_tp's do (`serve_tp.engine.rank_setup.setup_rank`: the same process group, shard and
dtype), then wraps its shard in Hugging Face's module (`hf_module_from_shard`, with this
baseline's own row-parallel layer) for `generate`. Only the driving differs: no batching,
one request at a time.

Kept from the tutorial: one request at a time per replica, `generate` per request on all
ranks, rank 0 answers. Changed so it can be benchmarked against serve_tp:
  * `max_ongoing_requests=1`. The tutorial's sync handler lets two requests enter their
    collectives in different orders on different ranks (a hang or garbage); one at a time is
    what it can safely do, and is what it did under light load.
  * rank 0 binds a free port and the others dial it (serve_tp.engine.distributed), instead of a
    random MASTER_PORT retried through `max_restarts`.
  * `POST /v1/completions` with the OpenAI fields the benchmark sends, instead of
    `GET /infer?text=`. `stream: true` is honoured with the whole text as one SSE chunk
    (generate returns only at the end), so a client's time to first token is its latency.
  * `ignore_eos` (generate with no EOS, so the length is fixed) and seeded sampling with
    temperature, top_p and top_k (every rank seeds the same, so all ranks pick the same
    tokens and stay in step).

    serve run benchmarks.tutorial_app:build_app model=/tmp/bench-tiny tensor_parallel_size=2 device=cpu
"""

# No `from __future__ import annotations`: FastAPI must see the request model itself,
# not a string, to read it from the body.
import asyncio
import json
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Literal, Optional

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve_tp.config import resolve_dtype

logger = logging.getLogger(__name__)


class TutorialConfig(BaseModel):
    """Settings of the tutorial baseline; the same keys as serve_tp's where they overlap."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., min_length=1, description="Local GPT-2 directory (config, weights, tokenizer).")
    served_model_name: Optional[str] = Field(None, description="Name clients put in `model`; defaults to the directory name.")
    tensor_parallel_size: int = Field(2, ge=1, le=64, description="Ranks per replica.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the ranks run.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: float16 on cuda, float32 on cpu.")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved for the HTTP replica.")
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs reserved for each rank actor.")
    collective_timeout_s: float = Field(300, gt=0, description="Process-group timeout.")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, self.device)

    def bundles(self) -> list[dict]:
        """Bundle 0 holds the replica, bundle 1 + r rank r: serve_tp's placement, so only the driving differs."""
        gpu = {"GPU": 1} if self.device == "cuda" else {}
        return [{"CPU": self.replica_cpus}] + [
            {"CPU": self.cpus_per_rank, **gpu} for _ in range(self.tensor_parallel_size)
        ]


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request the benchmark sends; any other field is
    refused (422) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: str = Field(..., min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    stream: bool = False
    stream_options: Optional[dict] = None
    seed: Optional[int] = None
    ignore_eos: bool = False


class RowParallelConv1D(torch.nn.Module):
    """Conv1D over this rank's slice of input rows; partial sums all-reduced, then the bias once.

    The baseline's own: serve_tp's forward (serve_tp/model/forward.py) does this inside its
    GEMM; Hugging Face's module needs it as a layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, all_reduce):
        super().__init__()
        self.weight, self.bias, self.nf = weight, bias, weight.shape[1]
        self._all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.mm(x.reshape(-1, x.size(-1)), self.weight)
        self._all_reduce(out)
        return (out + self.bias).view(x.size()[:-1] + (self.nf,))


def hf_module_from_shard(shard, all_reduce):
    """Hugging Face's GPT2LMHeadModel holding serve_tp's shard (the same tensors, no copy).

    Built on the shard's device, then every weight replaced by the shard's; attention is
    resized to this rank's heads (which may be one fewer than another rank's).
    """
    from transformers import AutoModelForCausalLM

    with torch.device(shard.device):
        model = AutoModelForCausalLM.from_config(shard.config, attn_implementation="sdpa")
    model.to(shard.dtype).eval()
    transformer, width = model.transformer, shard.plan.heads * shard.plan.head_dim
    transformer.wte.weight, transformer.wpe.weight = shard.wte, shard.wpe
    transformer.ln_f = shard.ln_f
    model.lm_head.weight = shard.vocab_projection
    for block, part in zip(transformer.h, shard.blocks):
        block.ln_1, block.ln_2 = part.ln_1, part.ln_2
        attn = block.attn
        attn.c_attn.weight, attn.c_attn.bias, attn.c_attn.nf = part.c_attn.weight, part.c_attn.bias, 3 * width
        attn.num_heads, attn.split_size, attn.embed_dim = shard.plan.heads, width, width
        attn.c_proj = RowParallelConv1D(part.attn_proj.weight, part.attn_proj.bias, all_reduce)
        block.mlp.c_fc.weight, block.mlp.c_fc.bias = part.c_fc.weight, part.c_fc.bias
        block.mlp.c_fc.nf = part.c_fc.weight.shape[1]
        block.mlp.c_proj = RowParallelConv1D(part.mlp_proj.weight, part.mlp_proj.bias, all_reduce)
    return model


class InferenceWorker:
    """One TP rank: serve_tp's shard of the model, driven by Hugging Face `generate`."""

    def __init__(self, rank: int, world_size: int, cfg: dict):
        self.rank = rank
        self.world_size = world_size
        self.cfg = TutorialConfig.model_validate(cfg)

    def address(self) -> tuple[str, int]:
        import ray

        from serve_tp.engine.distributed import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, address: str, port: int) -> None:
        from transformers import AutoTokenizer

        from serve_tp.engine.rank_setup import setup_rank
        from serve_tp.messages import RankSettings
        from serve_tp.model.source import context_length, read_model_config

        cfg = self.cfg
        settings = RankSettings(  # one slot, no graphs: this baseline decodes with HF generate
            model=cfg.model, served_model_name=cfg.model_name, device=cfg.device, dtype=cfg.resolved_dtype,
            max_batch_size=1, context_length=context_length(read_model_config(Path(cfg.model))),
            cuda_graphs=False, collective_timeout_s=cfg.collective_timeout_s,
        )
        ready = setup_rank(self.rank, self.world_size, address, port, settings)
        self.device = ready.device
        self.model = hf_module_from_shard(ready.shard, ready.comm.all_reduce)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)

    def inference(self, text: str, max_tokens: int, temperature: float, ignore_eos: bool, seed: int,
                  top_p: Optional[float] = None, top_k: Optional[int] = None):
        """Every rank runs the same generate; only rank 0's result is used."""
        import torch

        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        n_prompt = inputs["input_ids"].shape[1]
        kwargs = {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(seed)  # the same seed on every rank: the same tokens on every rank
            # top_k 0 (or -1, vLLM's "off") switches HF's top-k filter off, as top_p 1 does top-p's.
            kwargs = {"do_sample": True, "temperature": temperature,
                      "top_k": max(top_k or 0, 0), "top_p": 1.0 if top_p is None else top_p}
        if ignore_eos:
            kwargs["eos_token_id"] = None  # generate stops only at max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.eos_token_id, **kwargs
            )
        if self.rank != 0:
            return None
        new = out[0, n_prompt:].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if not ignore_eos and eos in new:
            new, finish = new[: new.index(eos)], "stop"
        return {
            "text": self.tokenizer.decode(new),
            "prompt_tokens": n_prompt,
            "completion_tokens": len(new),
            "finish_reason": finish,
        }


app = FastAPI()


# One request at a time: every request drives collectives on all ranks, and two at once could
# enter them in different orders on different ranks.
@serve.deployment(max_ongoing_requests=1, max_queued_requests=-1)
@serve.ingress(app)
class InferenceDeployment:
    def __init__(self, cfg: dict):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = TutorialConfig.model_validate(cfg)
        pg = ray.util.get_current_placement_group()
        worker_cls = ray.remote(InferenceWorker)
        gpus = 1 if self.cfg.device == "cuda" else 0
        self.workers = [
            worker_cls.options(
                num_cpus=self.cfg.cpus_per_rank,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank + 1),
            ).remote(rank, self.cfg.tensor_parallel_size, cfg)
            for rank in range(self.cfg.tensor_parallel_size)
        ]
        host, port = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(host, port) for w in self.workers])
        logger.info("tutorial baseline ready: %s", self.cfg.model_dump())

    @app.post("/v1/completions")
    async def completions(self, request: CompletionRequest):
        if request.model not in (None, self.cfg.model_name):
            return JSONResponse(
                {"error": {"message": f"model '{request.model}' is not served; this app serves "
                           f"'{self.cfg.model_name}'", "type": "NotFoundError", "param": "model", "code": 404}},
                status_code=404,
            )
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        refs = [
            w.inference.remote(request.prompt, request.max_tokens, request.temperature, request.ignore_eos, seed,
                               request.top_p, request.top_k)
            for w in self.workers
        ]
        result = (await asyncio.gather(*refs))[0]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        }
        choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": result["finish_reason"]}
        body = {"id": rid, "object": "text_completion", "created": created, "model": self.cfg.model_name}
        if not request.stream:
            return {**body, "choices": [choice], "usage": usage}

        include_usage = bool((request.stream_options or {}).get("include_usage"))

        def events():
            yield f"data: {json.dumps({**body, 'choices': [choice]})}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**body, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}


def build_app(args: dict):
    """Serve application builder: `serve run benchmarks.tutorial_app:build_app key=value ...`."""
    cfg = TutorialConfig.model_validate(args)
    return InferenceDeployment.options(
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        placement_group_bundles=cfg.bundles(),
        placement_group_strategy="STRICT_PACK",
    ).bind(cfg.model_dump())
