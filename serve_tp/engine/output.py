"""Rank 0's output processing: each sampled token's finish check and its delivery.

A sequence ends with "stop" on EOS (unless `ignore_eos`) or on one of its
`stop_token_ids`, once it has `min_tokens`; with "length" at `max_tokens` or when the
context is full. The stop token is delivered (it counts as a completion token, as vLLM
and OpenAI count EOS); the API leaves its text out, knowing the sequence's stop ids.
"""

from __future__ import annotations

from typing import Optional, Sequence as Seq

from serve_tp.engine.scheduler import Scheduler, Sequence
from serve_tp.messages import FinishReason, SequenceOutput, TokenLogprob


def finish_reason(seq: Sequence, token: int, eos_token_id: Optional[int], max_context: int) -> Optional[FinishReason]:
    """Why `seq` ends after emitting `token` (already appended to `seq.generated`), if it does."""
    params = seq.params
    produced = len(seq.generated)
    if produced >= params.min_tokens:
        if token == eos_token_id and not params.ignore_eos:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
    if produced >= params.max_tokens:
        return "length"
    if len(seq.request.prompt_ids) + produced >= max_context:
        return "length"
    return None


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, eos_token_id: Optional[int], max_context: int):
        self.scheduler = scheduler
        self.eos_token_id = eos_token_id
        self.max_context = max_context

    def deliver(
        self,
        rows: Seq[Sequence],
        tokens: Seq[int],
        logprobs: Optional[Seq[Optional[TokenLogprob]]] = None,
        prompt_logprobs: Optional[dict[str, list[Optional[TokenLogprob]]]] = None,
    ) -> None:
        """One sampled token per row (row order); finished rows are handed to the scheduler."""
        for row, (seq, token) in enumerate(zip(rows, tokens)):
            if seq.ended:  # failed at admission: its slot sampled a placeholder
                continue
            out = SequenceOutput()
            if prompt_logprobs and seq.seq_id in prompt_logprobs:
                out.prompt_logprobs = prompt_logprobs[seq.seq_id]
            if seq.params.max_tokens == 0:  # echo scoring: the prompt's logprobs, no completion
                out.finish_reason = "length"
                self._end(seq, out)
                continue
            seq.generated.append(token)
            out.token_ids = [token]
            if seq.params.logprobs is not None and logprobs is not None:
                out.logprobs = [logprobs[row]]
            out.finish_reason = finish_reason(seq, token, self.eos_token_id, self.max_context)
            if out.finish_reason is None:
                seq.sink(out)
            else:
                self._end(seq, out)

    def fail(self, seq: Sequence, message: str) -> None:
        """A failure confined to one sequence: it alone ends, with an error."""
        self._end(seq, SequenceOutput(finish_reason="error", error=message))

    def _end(self, seq: Sequence, out: SequenceOutput) -> None:
        seq.ended = True
        self.scheduler.finish(seq.seq_id)
        seq.sink(out)
