"""What every launcher of ``triton_kernels/`` shares: the device a launch plan
is made for, and the rules that keep Triton from compiling per step.

Triton compiles a kernel once per *specialisation key*: its constexprs and
launch options, the dtype of every pointer argument and whether its address
is a multiple of 16 bytes, and, for every int argument, whether it equals 1
(then it becomes a constant) or is a multiple of 16 (unless the argument is
listed in ``do_not_specialize``). A decode step that changes any of these
compiles the kernel again (tens to hundreds of milliseconds on the GPU). So
every launcher here keeps to three rules (``tests/kernels/test_launch_keys.py``
computes Triton's own keys of every launch and checks them):

1. An int argument that carries a per-step value (the batch size, a split
   count derived from it, the noise depth, a sequence-length bound, a stride
   that changes with one of these) is listed in the kernel's
   ``do_not_specialize``; a per-step length that a loop steps through in
   tiles is passed in tiles (``CHUNK_TILES * BLOCK``), so that what the
   compiler knows about its divisibility (vectorised loads) comes from the
   constexpr tile size, not from the value.
2. A pointer the launcher derives from its own allocations starts on a
   16-byte boundary whatever the batch size: views into one allocation sit at
   offsets rounded up with :func:`aligned`. Pointers the caller hands over
   that a kernel only reads one scalar from per row (per-row parameters,
   figures, seeds) are listed in ``do_not_specialize_on_alignment``: their
   alignment cannot matter to the code and must not matter to the key.
3. Constexprs and launch options depend on shapes that are fixed for a model
   (vocabulary, heads, head size, K) and on the batch size only through a
   small set (``logit_stats``: the split layout below the SM count, the row
   layout from it on).

:func:`device_profile` is the one place a launcher learns what it plans for.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

#: Triton specialises a pointer argument on this alignment (bytes).
ALIGN_BYTES = 16


class DeviceProfile(NamedTuple):
    """What a launch plan depends on: a GPU (``False``: CPU tensors under the
    Triton interpreter) and its number of streaming multiprocessors."""

    gpu: bool
    sms: int


#: The nominal SM count for CPU tensors under the interpreter (small, so that
#: the split layouts of ``logit_stats`` get exercised there too).
INTERPRETER_SMS = 8


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_profile(device: torch.device) -> DeviceProfile:
    """The :class:`DeviceProfile` launches on ``device`` are planned for."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceProfile(True, _cuda_sms(idx))
    return DeviceProfile(False, INTERPRETER_SMS)


def tensor_device(device) -> torch.device:
    """``device`` as a tensor made on it reports it (``"cuda"`` -> ``cuda:<current>``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def aligned(n: int, itemsize: int) -> int:
    """``n`` elements of ``itemsize`` bytes rounded up to whole 16-byte units
    (in elements): where the next view of an allocation may start."""
    per = max(1, ALIGN_BYTES // itemsize)
    return -(-int(n) // per) * per


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
