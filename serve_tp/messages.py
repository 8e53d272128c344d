"""The typed messages that cross the Ray boundary between the replica and its ranks.

Torch-free, so the HTTP replica (which never imports torch) and the ranks share one
definition: the settings a rank starts with, what one sequence asks for, and what a
poll of rank 0 returns. Adding a sampling field is one edit here plus the code that
uses it, checked by type checkers instead of string keys.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class RankSettings:
    """The resolved parts of ServeTPConfig every rank needs (built once by the replica)."""

    model: str
    served_model_name: str  # the model tag of rank 0's metrics
    device: Literal["cuda", "cpu"]
    dtype: str  # "float32" | "float16" | "bfloat16", already resolved for the device
    max_batch_size: int
    context_length: int  # the KV cache's positions per slot: min(n_positions, max_model_len)
    hf_revision: Optional[str] = None
    cuda_graphs: bool = True
    sampler_graphs: bool = True  # rank 0's sampling chain as CUDA graphs (cuda only)
    batch_wait_timeout_s: float = 0.002
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per engine step (chunked prefill)
    async_scheduling: bool = False  # rank 0 launches step n+1 before reading step n's tokens (loop.py)
    prefill_share_tokens: Optional[int] = None  # each prompt's first claim on that budget; None: a quarter
    collective_timeout_s: float = 900.0
    stall_timeout_s: float = 60.0
    max_logprobs: int = 20
    # The tokenizer's size, when the checkpoint's embedding has more rows (nanoGPT pads GPT-2's
    # 50257 to 50304): ids at or past it have no text, so rank 0 never samples them.
    sampleable_vocab: Optional[int] = None
    # How CPU ranks sum (ignored on cuda). The replica sends "auto" or "shm" only when its
    # placement group put every rank on one node: shared memory cannot reach another node.
    cpu_all_reduce: Literal["auto", "shm", "gloo"] = "gloo"
    # How plans reach the other ranks, resolved by the replica: "shm" only when every rank is
    # on its node (serve_tp/engine/plan_channel.py), else "gloo".
    plan_channel: Literal["shm", "gloo"] = "gloo"
    # The decode step's all-reduce on cuda, resolved by the replica: "p2p", "symm_mem" or "auto"
    # only when every rank is on its node (serve_tp/engine/fast_all_reduce.py), else "nccl".
    gpu_all_reduce: Literal["auto", "p2p", "symm_mem", "nccl"] = "nccl"
    # torch.compile the decode step's pieces between GEMMs and all-reduces (serve_tp/model/compiled.py)
    compile_decode: bool = False
    # the decode step's K/V write + attention: "sdpa" (index_put + SDPA) or "triton" (one kernel, cuda only)
    decode_attention: Literal["sdpa", "triton"] = "sdpa"
    # decode steps of up to 32 rows as five Triton kernels a layer (serve_tp/model/fused_linear.py)
    fused_decode: bool = False


@dataclass(frozen=True)
class GroupEndpoint:
    """A started TP group, as its owner (TPGroupDeployment) hands it to the API replicas that
    attach to it (`api_replicas`): Ray actor handles travel inside Ray's own serialization,
    so each API replica talks to rank 0 directly, not through the owner."""

    workers: tuple[Any, ...]  # InferenceWorker actor handles (ray.actor.ActorHandle), rank 0 first
    rank_info: tuple[dict, ...]  # each rank's setup answer, for /health and the startup log
    owner: str  # the owning replica's id


@dataclass(frozen=True)
class SamplingParams:
    """What decides one sequence's tokens and when it ends (vLLM's semantics where OpenAI is silent).

    `temperature == 0` is greedy. `seed is None` means the engine draws a random seed for
    the sequence; its noise then depends only on (seed, position), never on its batch
    neighbours. `logprobs`/`prompt_logprobs` ask for that many top alternatives (0: the
    chosen token's only); None asks for none.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence submitted to rank 0."""

    seq_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """A position's chosen token and its log-probability under the model's raw distribution,
    with the `top` alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def __reduce__(self):
        return TokenLogprob, (self.token_id, self.logprob, self.top)  # not a frozen dataclass's state dict


@dataclass
class SequenceOutput:
    """New tokens of one sequence since the last poll (several steps may be merged).

    `logprobs` has one entry per token in `token_ids` when the sequence asked for them.
    `prompt_logprobs` comes once, with the first output of a sequence that asked for it:
    one entry per prompt token, the first None (nothing precedes it). A sequence with
    max_tokens 0 gets only that, and finishes with "length".
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    group_failed: bool = False  # with "error": the whole TP group failed (503), not this sequence alone

    def __reduce__(self):
        """Its fields in order, trailing defaults left out: a decode step's output pickles as
        (class, ([token],)), not as a class and a state dict of six fields."""
        if self.logprobs is None and self.prompt_logprobs is None and self.error is None and not self.group_failed:
            if self.finish_reason is None:
                return SequenceOutput, (self.token_ids,)
            return SequenceOutput, (self.token_ids, None, None, self.finish_reason)
        return SequenceOutput, (self.token_ids, self.logprobs, self.prompt_logprobs, self.finish_reason,
                                self.error, self.group_failed)

    def merge(self, later: "SequenceOutput") -> "SequenceOutput":
        """This output followed by `later`, as one."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return SequenceOutput(
            token_ids=self.token_ids + later.token_ids,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            finish_reason=later.finish_reason,
            error=later.error,
            group_failed=later.group_failed,
        )


# Rank 0 <-> replica, as bytes. Ray pickles an actor call's arguments and results with
# cloudpickle, a Python-level Pickler: a poll's dict of 128 outputs cost ~475 us to
# serialize on rank 0 (whose GIL the engine thread shares) and about half that to read
# on the replica. Ray passes `bytes` through as they are, so these messages are pickled
# with the C pickler instead (~70 us; benchmarks/bench_stream_path.py). Both ends are our
# own processes, as with Ray's own pickling.


def pack(message) -> bytes:
    """A message (SequenceRequest, a poll's dict of SequenceOutputs) for an actor call."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes):
    """What `pack` packed."""
    return pickle.loads(data)
