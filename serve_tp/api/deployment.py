"""InferenceDeployment: the HTTP replica, owning one TP group of ranks or (api_replicas > 1)
attached to one that a TPGroupDeployment replica owns."""


import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import ray
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_tp.api.admission import Admission
from serve_tp.api.auth import authorized
from serve_tp.config import ServeTPConfig
from serve_tp.api.errors import APIError, error_response, from_validation_error, install_handlers
from serve_tp.metrics import RequestMetricsMiddleware, record_rank_health
from serve_tp.model.source import check_model_shardable, context_length, read_model_config, resolve_model_dir
from serve_tp.placement import rank_bundle_index, replica_bundles
from serve_tp.api.protocol import CompletionRequest, CompletionResponse, ModelList
from serve_tp.api.serving import CompletionService
from serve_tp.tp_group import RankFailure, TPGroup

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above max_prompt_chars of JSON-escaped text

api = FastAPI(title="serve_tp", description="OpenAI-compatible completions, tensor parallel.")
install_handlers(api)
api.add_middleware(RequestMetricsMiddleware)

_COMPLETION_SCHEMA = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_COMPLETION_DEFS = _COMPLETION_SCHEMA.pop("$defs", {})


def _openapi() -> dict:
    """FastAPI's document plus the completions body, which the route parses itself."""
    if api.openapi_schema is None:
        doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(_COMPLETION_DEFS)
        schemas["CompletionRequest"] = _COMPLETION_SCHEMA
        api.openapi_schema = doc
    return api.openapi_schema


api.openapi = _openapi

REPLICA_HEADER = b"x-serve-tp-replica"


class ReplicaHeader:
    """Pure ASGI, as RequestMetricsMiddleware: every response names the replica (so the TP
    group) that answered it, for clients and tests that spread requests over replicas.

    The id comes from Serve's replica context, not `api.state`: serve.ingress serves a
    pickled copy of `api`, which state set on the module's object never reaches.
    """

    def __init__(self, app):
        self.app = app
        self.replica: Optional[bytes] = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.replica is None:
            self.replica = serve.get_replica_context().replica_id.unique_id.encode()

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica)]}
            await send(message)

        await self.app(scope, receive, send_named)


api.add_middleware(ReplicaHeader)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes MAX_BODY_BYTES (never read whole)."""
    too_big = APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def load_tokenizer_and_context(config: ServeTPConfig):
    """(the fast tokenizer, the context length): what every replica of a group reads from the
    checkpoint before it spawns or attaches to ranks. Raises on a checkpoint we cannot serve."""
    from tokenizers import Tokenizer

    model_dir = resolve_model_dir(config.model, config.hf_revision)
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
    model_config = read_model_config(Path(model_dir))
    check_model_shardable(model_config, config.tensor_parallel_size)
    return Tokenizer.from_file(str(tokenizer_file)), context_length(model_config, config.max_model_len)


def placement_record(config: ServeTPConfig, device: str) -> dict:
    """The startup log's placement: strategy, bundles, and the group Serve reserved."""
    placement_group = ray.util.get_current_placement_group()
    return {"strategy": config.placement_strategy, "bundles": replica_bundles(config, device),
            "placement_group_id": placement_group.id.hex() if placement_group else None}


@serve.deployment
@serve.ingress(api)
class InferenceDeployment:
    """The HTTP replica. With no `group_owner` (api_replicas 1) it spawns and owns its TP
    group; with one (a handle on TPGroupDeployment) it attaches to a group that replica owns,
    as one of its api_replicas HTTP replicas."""

    async def __init__(self, config: dict, device: str, api_key_digest: Optional[str] = None,
                       group_owner: Optional[DeploymentHandle] = None):
        self.config = ServeTPConfig.model_validate(config)
        self.device = device
        self.api_key_digest = api_key_digest
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        api.state.served_model_name = self.config.model_name  # the request metrics' model tag
        started = time.monotonic()
        self.tokenizer, self.context_length = load_tokenizer_and_context(self.config)
        if group_owner is None:
            self.group = TPGroup.spawn(self.config, device, self.context_length,
                                       sampleable_vocab=self.tokenizer.get_vocab_size(with_added_tokens=True))
            ranks, owner = await self.group.start(), self.replica_id
        else:
            endpoint = await group_owner.attach.remote()
            self.group = TPGroup.attach(self.config, endpoint, client=self.replica_id)
            ranks, owner = endpoint.rank_info, endpoint.owner
        self.group_owner = owner  # the replica whose TP group serves this one (itself, or a TPGroupDeployment)
        self.service = CompletionService(self.config, self.tokenizer, self.context_length, self.group)
        max_running, max_waiting = self.config.api_replica_limits()
        self.admission = Admission(max_running, max_waiting, self.config.overload_status_code,
                                   self.config.overload_retry_after_s, sharers=self.config.api_replicas)
        self.created = int(time.time())
        logger.info(json.dumps({
            "event": "replica_started", "model": self.config.model, "served_as": self.config.model_name,
            "replica": self.replica_id, "group_owner": owner, "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.device, "dtype": self.config.resolved_dtype(self.device),
            "tensor_parallel_size": self.config.tensor_parallel_size, "api_replicas": self.config.api_replicas,
            "placement": placement_record(self.config, device) if group_owner is None else None,
            "ranks": [{**info, "bundle_index": rank_bundle_index(info["rank"])} for info in ranks],
            "settings": self.config.model_dump(mode="json"),  # holds no secret: the API key is not in it
            "startup_s": round(time.monotonic() - started, 1),
        }))

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the whole replica (an
        attached one too: its replacement attaches again). The ranks' health gauge is the
        owner's to record, so a dashboard counts each rank once."""
        try:
            await self.group.health()
        finally:
            if self.group.owns_ranks:
                record_rank_health(self.config.model_name, self.replica_id, self.group.rank_healthy)

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()

    # ---- routes ----
    def _authorize(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization"), self.api_key_digest):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @api.post(
        "/v1/completions",
        response_model=CompletionResponse,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}}}},
    )
    async def completions(self, request: Request):
        self._authorize(request)
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            # A text/plain or form POST is one a web page may send cross-site without preflight.
            raise APIError(415, f"Content-Type must be application/json, got '{content_type}'",
                           code="unsupported_media_type")
        self.admission.check()  # refuse before reading and tokenizing: shedding must be cheap
        body = await read_body(request)
        try:
            req = CompletionRequest.model_validate_json(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        jobs = self.service.plan(req)
        self.admission.check()  # again, exact after the awaits above; before a stream's 200
        if req.stream:
            return StreamingResponse(self.admission.wrap_stream(self.service.stream(req, jobs)),
                                     media_type="text/event-stream")
        async with self.admission.turn():
            return JSONResponse(await self.service.complete(req, jobs))

    @api.get("/v1/models", response_model=ModelList)
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "serve_tp",
            "root": self.config.model, "max_model_len": self.context_length}]}

    @api.get("/infer")
    async def infer(self, request: Request, text: str = "") -> str:
        """The tutorial's route: the prompt followed by its greedy continuation."""
        self._authorize(request)
        req = CompletionRequest(prompt=text, temperature=0.0, max_tokens=self.config.default_max_tokens)
        jobs = self.service.plan(req)
        self.admission.check()
        async with self.admission.turn():
            result = await self.service.complete(req, jobs)
        return text + result["choices"][0]["text"]

    @api.get("/health")
    async def health(self):
        try:
            ranks = await self.group.health()
        except RankFailure as exc:
            return error_response(APIError(503, f"unhealthy: {exc}", code="unhealthy"))
        return {"status": "ok", "replica": self.identity(), "ranks": ranks, "admission": self.admission.load()}

    def identity(self) -> dict:
        """Which replica answered, and proof that its process kept torch out (see .importlinter)."""
        return {"id": self.replica_id, "pid": os.getpid(), "group_owner": self.group_owner,
                "torch_imported": "torch" in sys.modules, "deepspeed_imported": "deepspeed" in sys.modules}
