"""Host values onto the device without waiting for the device.

A plain copy from pageable host memory to a GPU synchronises the stream: the host waits
for every kernel queued before it. With async scheduling (serve_tp/engine/loop.py) a step
is still running when the host prepares the next one (prefill chunks, a joining
sequence's sampler row, decode positions), so such a copy would throw the overlap away.
These go through pinned memory and a non-blocking copy instead: ordered on the stream
like any kernel, and torch's pinned-memory cache keeps the host buffer until the copy
has run. On CPU they are plain tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch


def upload(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a flat list of numbers) as a tensor on `device`."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def upload_tensor(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` (pinned first on cuda)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
