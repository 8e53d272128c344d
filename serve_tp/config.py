"""All settings of a serve_tp application, validated once when the app is built.

The same keys come from `serve run serve_tp.app:build_app key=value ...` (strings,
coerced by pydantic) and from the `args:` of an application in service.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
PlacementStrategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]
CpuAllReduce = Literal["auto", "shm", "gloo"]
PlanChannel = Literal["auto", "shm", "gloo"]
GpuAllReduce = Literal["auto", "p2p", "symm_mem", "nccl"]
DecodeAttention = Literal["sdpa", "triton"]


def resolve_dtype(dtype: str, device: str) -> str:
    """The one dtype rule, for the app, the ranks and the tutorial baseline.

    auto: float16 on cuda (speed), float32 on cpu. float16 on cpu is refused: DeepSpeed's
    CPU accelerator lists only float32 and bfloat16 (init_inference would fail on every
    rank, tests/test_loader.py), so it fails here first, with the fix in the message.
    """
    if device == "cpu" and dtype == "float16":
        raise ValueError("dtype float16 is not supported with device cpu: use float32 or bfloat16")
    if dtype != "auto":
        return dtype
    return "float16" if device == "cuda" else "float32"


def check_decode_attention(choice: str, device: str, fused_decode: bool = False) -> None:
    """The one rule for the decode step's Triton kernels (decode_attention triton, fused_decode),
    named or resolved device alike: they need a GPU, and a CPU deployment asking for them is
    refused rather than quietly given torch's path (a setting that silently does nothing
    would hide a misconfigured benchmark)."""
    if choice == "triton" and device == "cpu":
        raise ValueError("decode_attention triton needs device cuda (a Triton GPU kernel): use sdpa on cpu")
    if fused_decode and device == "cpu":
        raise ValueError("fused_decode needs device cuda (Triton GPU kernels): leave it off on cpu")


class AutoscalingSettings(BaseModel):
    """Serve autoscaling; each replica is a whole TP group, so scale in groups."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest TP groups kept running.")
    max_replicas: int = Field(2, ge=1, description="Most TP groups started under load.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class ServeTPConfig(BaseModel):
    """One pydantic model for every setting of the application."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- model ---
    model: str = Field("gpt2", min_length=1, description="Hugging Face Hub id or local directory.")
    served_model_name: Optional[str] = Field(
        None, min_length=1, description="Name clients put in `model`; defaults to `model`."
    )
    hf_revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")

    # --- parallelism and placement ---
    tensor_parallel_size: int = Field(2, ge=1, le=64, description="Ranks (GPUs) per replica.")
    device: Device = Field("auto", description="auto: cuda when the cluster has GPUs, else cpu.")
    dtype: DType = Field("auto", description="auto: float16 on cuda, float32 on cpu.")
    placement_strategy: PlacementStrategy = Field(
        "STRICT_PACK", description="Placement group strategy of one replica's bundles."
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved for the replica (HTTP, tokenizer).")
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs reserved for each rank actor.")
    cpu_all_reduce: CpuAllReduce = Field(
        "auto", description="How CPU ranks sum their row-parallel outputs. auto: DeepSpeed's "
        "shared-memory all-reduce when every rank is on one node and DeepSpeed has built its op, "
        "else gloo. shm: shared memory or fail at start. gloo: always gloo (TCP). Ignored on cuda (NCCL)."
    )

    plan_channel: PlanChannel = Field(
        "auto", description="How rank 0 sends each step's plan to the other ranks. auto: a shared-memory "
        "ring on cuda when every rank is on one node (about 10 µs a step, against 0.4 ms over gloo), "
        "else gloo. shm: the ring or fail at start. gloo: always the CPU process group (TCP)."
    )

    gpu_all_reduce: GpuAllReduce = Field(
        "nccl", description="How GPU ranks sum inside a decode step. p2p: our one-kernel sum over "
        "peer memory (serve_tp/engine/p2p_all_reduce.py: each rank publishes its partial in a "
        "symmetric buffer, flags its peers, reads theirs over NVLink and adds the residual, in the "
        "model's dtype; bitwise NCCL's sum at TP=2; steps of more than 32 rows sum over NCCL), or fail "
        "at start. On 2xH200, with compile_decode, it made batch-1 steps of gpt2-large/xl 3-10% shorter "
        "and larger batches no faster (docs/gpu.md), so it is not the default. symm_mem: torch's symmetric-memory "
        "one-shot (fp16 staged in float32; slower than NCCL in our graphs, docs/gpu.md), or fail. "
        "auto: p2p when every rank is on one node and every rank can set it up, else NCCL. nccl: "
        "always NCCL. Prefill always uses NCCL. Ignored on cpu."
    )

    wait_for_resources: bool = Field(
        False, description="Deploy even when the cluster can never hold one replica and has no "
        "autoscaler (you will add nodes by hand). Off: build_app refuses at once, with the numbers."
    )

    # --- replicas ---
    num_replicas: int = Field(1, ge=1, le=1024, description="TP groups when autoscaling is off.")
    autoscaling_config: Optional[AutoscalingSettings] = Field(
        None, description="If set, replaces num_replicas."
    )
    api_replicas: int = Field(
        1, ge=1, le=64, description="HTTP replicas per TP group (vLLM's --api-server-count). 1 (default): "
        "one replica serves HTTP and owns its group. N > 1: each group is owned by a TPGroupDeployment "
        "replica and N InferenceDeployment replicas serve HTTP for it, each submitting to and polling rank 0 "
        "directly, so parsing, tokenizing, detokenizing and streaming run on N event loops, not one: "
        "a burst of arrivals waits for one replica's share of it. max_ongoing_requests and "
        "max_queued_requests stay the group's, split between its API replicas. One group only (num_replicas "
        "1, no autoscaling_config). On 2xH200 4 of them cut TTFT under a 128-user burst but raised TPOT "
        "(BENCHMARKS.md)."
    )

    # --- batching ---
    max_batch_size: int = Field(32, ge=1, le=1024, description="Sequences decoded together.")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0, le=1, description="How long an idle engine waits to gather a batch."
    )

    max_prefill_tokens: int = Field(
        2048, ge=1, le=1_000_000, description="Prompt tokens prefilled per engine step (chunked prefill). "
        "A longer prompt, or several, spread over steps while running streams keep decoding in every one: "
        "a step's cost, so every stream's time per token, stays bounded as long prompts arrive. Lower it "
        "for steadier TPOT under heavy prompt traffic, raise it for faster TTFT when prompts are rare."
    )
    prefill_share_tokens: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="When prompts contend for a step's prefill budget, each "
        "(in arrival order) first gets a share of at most this many tokens, then what is left goes to the "
        "unfinished ones in turn: a short prompt behind long ones finishes in the step it is admitted "
        "instead of waiting for their chunks (vLLM's long_prefill_token_threshold, but a cap only under "
        "contention). None (default): max_prefill_tokens // 4. max_prefill_tokens or more: plain first "
        "come, first served."
    )

    async_scheduling: Optional[bool] = Field(
        None, description="Rank 0 plans and launches step n+1 before it reads step n's sampled "
        "tokens back (vLLM's async scheduling): the decoding rows take their tokens from a device "
        "buffer that rank 0 broadcasts to the other ranks, and the host's work (waiting for the "
        "tokens, finish checks, delivery, the next plan) overlaps the device's step. Same outputs "
        "as off; a finished or cancelled row computes one extra token that is dropped, and "
        "leaves a step later. None (default): on with cuda, where 2xH200 measured 1.2-1.3x the "
        "tokens/s at 128 users and sampled batch-1 TPOT 1.3 -> 1.1 ms (BENCHMARKS.md); off on cpu, "
        "where the ranks' compute and the host share the same cores and there is no device step to overlap."
    )

    stream_batching_interval_ms: float = Field(
        0, ge=0, le=1000, description="Under load, each sequence hands its stream at most one chunk "
        "per this many ms, carrying every token decoded meanwhile (Ray Serve LLM's "
        "stream_batching_interval_ms, 50 there). A sequence's first output and its end are never "
        "held back. 0 (default): no pacing; a chunk still carries every output that queued while "
        "the previous one was sent. On CPU, 50 ms cut chunks 2-4x at 16-64 users with tokens/s "
        "within noise (BENCHMARKS.md, 'Where the time goes on the HTTP path'); on one H200 it raised TTFT "
        "and cost 9% of tokens/s at 128 users (BENCHMARKS.md, fourth session)."
    )
    stream_batching_min_streams: int = Field(
        8, ge=1, description="Sequences in flight on the replica from which stream batching applies; "
        "with fewer, every output goes out as it comes (a lone user's tokens are not bunched)."
    )

    cuda_graphs: bool = Field(
        True, description="Replay decode steps as CUDA graphs (GPU only): one launch per step "
        "instead of hundreds. Off: eager kernels, for debugging."
    )
    compile_decode: bool = Field(
        False, description="torch.compile the decode step's layer norms, residual adds and bias + GELU "
        "into fused kernels between the GEMMs and all-reduces (Inductor without its own CUDA graphs; "
        "the decode graphs capture the compiled step). Costs compile time at start (~8 s a rank). On 2xH200 "
        "5-12% shorter TP=2 decode steps, and with decode_attention triton gpt2's batch-1 step at TP=1 "
        "0.56 -> 0.42 ms (docs/gpu.md); under the serving app it served correctly but was slower at 32-128 "
        "users (BENCHMARKS.md), so off by default. Ignored on cpu."
    )
    decode_attention: DecodeAttention = Field(
        "sdpa", description="How a decode step stores this token's K/V and attends over the cache. sdpa: "
        "an index_put, then torch's scaled_dot_product_attention over the padded span with a mask. triton: "
        "one Triton kernel per layer doing both, each row reading only its own length "
        "(serve_tp/model/decode_attention.py); cuda only, refused on cpu. Default sdpa: on 2xH200 the kernel was exact and cut 17-41 kernels a step, but faster only at batch 32 and at TP=2, slower at TP=1 batch 1 (docs/gpu.md)."
    )
    fused_decode: bool = Field(
        False, description="Decode steps of up to 32 rows as five Triton kernels a layer: layer norm + "
        "Q|K|V GEMM, attention with the cache write (decode_attention's triton kernel), the attention's "
        "projection with the sum over the ranks and the residual in the GEMM's own kernel, layer norm + "
        "c_fc + GELU, and the MLP's projection likewise (serve_tp/model/fused_linear.py). The sum goes "
        "through the p2p all-reduce's buffers where gpu_all_reduce resolves to p2p, else over NCCL after "
        "the kernel. Larger steps keep the unfused path. cuda only, refused on cpu. Off by default: on "
        "2xH200 it is exact and runs 40-49% fewer kernels, but its Triton GEMVs read DRAM slower than "
        "cuBLAS, so a TP=2 step over p2p is only as fast as compile_decode + triton attention (gpt2-large "
        "1.74 vs 1.75 ms), and a TP=1 step slower (1.70 vs 1.36 ms; docs/gpu.md, 'Fused decode layers')."
    )
    sampler_graphs: bool = Field(
        True, description="Replay rank 0's sampling chain (temperature, top-k/top-p, penalties, "
        "logprobs) as CUDA graphs, one per batch size and feature set, captured on first reuse "
        "(GPU only; ignored on cpu). Bit for bit the eager sampler's tokens (tests/test_gpu.py), "
        "4-9x faster per sampled step on H200 (docs/results/h200x1/sampler_graphs.md)."
    )
    max_model_len: Optional[int] = Field(
        None, ge=2, description="Longest prompt + completion in tokens; sizes the KV cache "
        "(max_batch_size slots of this many tokens per rank). Default and cap: the model's context."
    )

    # --- generation defaults ---
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request omits it.")
    default_temperature: float = Field(1.0, ge=0, le=2, description="As OpenAI: 1.0.")
    default_top_p: float = Field(1.0, gt=0, le=1)

    # --- limits ---
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica runs at once (in the batch or the engine's queue)."
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests one replica holds waiting for a turn; past this it refuses "
        "with overload_status_code and Retry-After at once. -1 = unbounded."
    )
    overload_status_code: int = Field(
        503, description="Status of a refused request: 503 (the server is overloaded; clients and load "
        "balancers retry elsewhere or later) or 429 (as TGI answers)."
    )
    overload_retry_after_s: int = Field(
        1, ge=0, le=3600, description="Retry-After (seconds) on a refused request."
    )
    max_logprobs: int = Field(
        20, ge=0, le=1000, description="Largest `logprobs` (top alternatives per token) a request may ask for."
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per prompt).")
    max_prompts_per_request: int = Field(16, ge=1, description="Largest prompt list.")
    max_prompt_chars: int = Field(100_000, ge=1, description="Longest prompt string accepted.")
    max_stop_sequences: int = Field(4, ge=1, le=64)
    request_timeout_s: float = Field(120, gt=0, description="A request that runs longer gets 504.")
    startup_timeout_s: float = Field(900, gt=0, description="Model download + load + group setup.")
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    stall_timeout_s: float = Field(
        60, gt=0, description="A rank with work that makes no step for this long is unhealthy."
    )

    @field_validator("overload_status_code")
    @classmethod
    def _overload_status(cls, value: int) -> int:
        if value not in (429, 503):
            raise ValueError(f"must be 429 or 503, got {value}")
        return value

    @model_validator(mode="after")
    def _device_dtype(self) -> "ServeTPConfig":
        if self.device != "auto":  # "auto" is resolved, and checked, by resolved_dtype at build time
            resolve_dtype(self.dtype, self.device)
            check_decode_attention(self.decode_attention, self.device, self.fused_decode)
        return self

    @model_validator(mode="after")
    def _shm_on_one_node(self) -> "ServeTPConfig":
        if self.cpu_all_reduce == "shm" and self.placement_strategy == "STRICT_SPREAD" and self.tensor_parallel_size > 1:
            raise ValueError("cpu_all_reduce shm needs every rank on one node, and placement_strategy "
                             "STRICT_SPREAD puts each rank on its own: use auto or gloo")
        return self

    @model_validator(mode="after")
    def _api_replicas_one_group(self) -> "ServeTPConfig":
        """Each HTTP replica attaches to the group Serve's router hands its `attach` call to:
        with one group that is the group; with several, nothing would keep them spread evenly
        (a group could be left with none, its GPUs idle), nor send a replaced group its share."""
        if self.api_replicas > 1 and (self.autoscaling_config is not None or self.num_replicas > 1):
            raise ValueError("api_replicas > 1 needs one TP group (num_replicas 1, no autoscaling_config): "
                             "HTTP replicas are not yet assigned to groups evenly")
        return self

    def api_replica_limits(self) -> tuple[int, int]:
        """(requests running, requests waiting; -1: unbounded) of one HTTP replica: the group's
        max_ongoing_requests and max_queued_requests split between its api_replicas."""
        running = -(-self.max_ongoing_requests // self.api_replicas)
        waiting = self.max_queued_requests
        if waiting > 0:
            waiting = -(-waiting // self.api_replicas)
        return running, waiting

    @property
    def model_name(self) -> str:
        """The id clients use in the `model` field."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.name if path.is_dir() else self.model

    def resolved_async_scheduling(self, device: str) -> bool:
        """async_scheduling as set, or by default on with cuda (a device step to overlap the
        host's work with) and off on cpu (ranks and host share the cores)."""
        return device == "cuda" if self.async_scheduling is None else self.async_scheduling

    def resolved_dtype(self, device: str) -> str:
        """The dtype the ranks load in on `device` (resolve_dtype); ValueError if it cannot run there
        (that dtype, or decode_attention, on that device)."""
        check_decode_attention(self.decode_attention, device, self.fused_decode)
        return resolve_dtype(self.dtype, device)
