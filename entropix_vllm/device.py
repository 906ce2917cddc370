"""The one door for host-to-device copies on the per-step path.

A copy from pageable host memory to a CUDA device first waits for the stream
to drain (a host sync); a copy from pinned memory with ``non_blocking=True``
does not. Every host value the Entropix step sends to the device each step
(row settings, masks, trace row indices) goes through :func:`to_device` or
:func:`copy_to_device`; the
sync test (``tests/e2e/test_sync_free.py``) counts copies made anywhere else.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned staging on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def copy_to_device(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for a host ``src`` without a host sync (pinned
    staging, non-blocking on CUDA); returns ``dst``."""
    if dst.device.type == "cuda":
        return dst.copy_(src.pin_memory(), non_blocking=True)
    return dst.copy_(src)
