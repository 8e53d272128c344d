"""One step's sampled tokens between sampling and delivery, read back without stalling the device.

Synchronous scheduling reads them at once (`tolist`, which waits for the step). Async
scheduling starts their copy to the host right after sampling, into pinned memory and
without blocking, records an event after it, and waits on that event alone one step
later, when the device is already busy with the next step (vLLM's AsyncGPUModelRunnerOutput).
The logprobs a row asked for travel the same way. On CPU the tensors are on the host already.
"""

from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from serve_tp.engine.sampling import SampleResult
from serve_tp.messages import TokenLogprob


def _pinned_copy(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class SampledStep:
    """The rows a step sampled (rank 0's Sequence records, in row order), their tokens and
    logprobs, and the prompt logprobs of sequences whose prefill ended in it.

    `plan_index` is the number of plans rank 0 had broadcast when it launched the step: the
    loop compares it with the count at `read` to tell whether the host read the tokens
    before or after it sent the next plan.
    """

    def __init__(self, rows: Seq, result: Optional[SampleResult], prompt_logprobs: dict, plan_index: int,
                 copy_ahead: bool = False, error: Optional[str] = None):
        self.rows = rows
        self.prompt_logprobs = prompt_logprobs
        self.plan_index = plan_index
        self.error = error  # sampling failed: the rows end with it, in the order a delivery would come
        self._result = result
        self._copied: Optional[torch.cuda.Event] = None
        if copy_ahead and result is not None and result.tokens.device.type == "cuda":
            with torch.inference_mode():
                self._result = SampleResult(_pinned_copy(result.tokens), _pinned_copy(result.logprobs),
                                            _pinned_copy(result.top_ids), _pinned_copy(result.top_logprobs),
                                            result.wanted)
            self._copied = torch.cuda.Event()
            self._copied.record()

    @classmethod
    def failed(cls, rows: Seq, error: str, plan_index: int) -> "SampledStep":
        return cls(rows, None, {}, plan_index, error=error)

    def read(self) -> tuple[list[int], Optional[list[Optional[TokenLogprob]]]]:
        """The tokens, and each row's TokenLogprob when any row asked; waits for them if needed."""
        if self._copied is not None:
            self._copied.synchronize()
        result = self._result
        tokens = result.tokens.tolist()
        logprobs = result.token_logprobs() if result.logprobs is not None else None
        return tokens, logprobs
