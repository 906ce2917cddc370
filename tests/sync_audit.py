"""Counting host-device synchronisations and blocking copies, on CPU (test helper).

On a GPU a host sync is any call that needs a device value on the host
(``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ops whose output shape
depends on values such as ``nonzero``) and a blocking copy is a host-to-device
copy from pageable memory. On CPU nothing blocks, so :class:`SyncAudit` counts
the *calls* that would: a ``TorchFunctionMode`` sees every tensor method and
torch function called from Python, a ``TorchDispatchMode`` every aten op
(``aten::_local_scalar_dense`` is what ``item()`` / ``int(t)`` / ``bool(t)``
dispatch to). Each event is attributed to the nearest Python frame outside
torch and this file: ``entropix_vllm`` code is "ours", anything else (vLLM's
own sampler, called for stock rows) is "theirs".

Host tensors: ``host_tensors`` (the runner's ``*_cpu`` buffers, host memory
on a GPU too) and whatever ``torch.from_numpy`` / ``torch.tensor`` /
``torch.as_tensor`` make without a ``device``. Reading them is no sync;
copying them to a device is a copy. A device tensor moved to its own device
is no copy. Not counted: copies made inside
the project's host-to-device door, ``entropix_vllm.device`` (``to_device``,
``copy_to_device``)
(pinned staging and a non-blocking copy on CUDA), which are counted apart.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_T = torch.Tensor
#: Tensor methods that read device values on the host (a sync on a GPU).
SYNC_METHODS = {
    _T.item: "item", _T.tolist: "tolist", _T.cpu: "cpu", _T.numpy: "numpy",
    _T.__bool__: "bool", _T.__int__: "int", _T.__float__: "float", _T.__index__: "index",
}
#: Calls that copy to a device (blocking from pageable host memory on a GPU).
COPY_CALLS = {_T.to: "to(device)", _T.cuda: "cuda", _T.copy_: "copy_"}
#: torch functions (which function modes do not see) whose result holds host
#: data when made without a ``device``; with a ``device`` they are a copy.
HOST_MAKERS = ("from_numpy", "tensor", "as_tensor")
#: aten ops that synchronise on a GPU (host value, or a value-dependent output shape).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero",
            "repeat_interleave", "item")

_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_DOORS = ("to_device", "copy_to_device")   # entropix_vllm.device


@dataclass
class Event:
    kind: str       # "sync", "copy" or "alloc"
    what: str       # e.g. "item", "aten::nonzero", "to(device)"
    where: str      # file:line of the attributed frame
    ours: bool

    def __str__(self) -> str:
        return f"{self.kind} {self.what} at {self.where}"


def _is_ours(filename: str) -> bool:
    return f"{os.sep}entropix_vllm{os.sep}" in filename or \
        f"{os.sep}triton_kernels{os.sep}" in filename


_INTERPRETER = os.path.join("triton", "runtime", "interpreter.py")


def _caller() -> tuple:
    """(file:line, ours, inside the to_device door, inside an interpreted Triton
    kernel) of the nearest frame that is neither torch's nor this file's."""
    f = sys._getframe(2)
    site = None
    door = kernel = False
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if site is None and fn != _HERE and not fn.startswith(_TORCH) and "<" not in fn[:1]:
            site = (f"{fn}:{f.f_lineno}", _is_ours(fn))
        if f.f_code.co_name in _DOORS and _is_ours(fn):
            door = True
        if fn.endswith(_INTERPRETER):
            kernel = True   # the Triton interpreter running a kernel: no host code of ours
        f = f.f_back
    if site is None:
        return "?", False, door, kernel
    return site[0], site[1], door, kernel


def _storages(ts: Iterable[torch.Tensor]) -> "weakref.WeakValueDictionary":
    """data_ptr -> a live tensor holding that storage (weak: a freed tensor's
    address, reused by the allocator, is no longer "host")."""
    out = weakref.WeakValueDictionary()
    for t in ts:
        if isinstance(t, torch.Tensor):
            out[t.untyped_storage().data_ptr()] = t
    return out


def host_tensors_of(*objs) -> List[torch.Tensor]:
    """The host-side buffers of vLLM runner objects: tensor attributes whose
    name ends in ``_cpu`` or ``_cpu_tensor`` (host memory on a GPU too)."""
    out = []
    for o in objs:
        for name, v in vars(o).items():
            if isinstance(v, torch.Tensor) and (name.endswith("_cpu") or name.endswith("_cpu_tensor")):
                out.append(v)
    return out


class _Functions(TorchFunctionMode):
    def __init__(self, audit: "SyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a = self.audit
        if func in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            if not a._is_host(args[0]):
                a._record("sync", SYNC_METHODS[func])
        elif func in COPY_CALLS:
            if self._to_device(func, args, kwargs):
                a._record("copy", COPY_CALLS[func])
        return func(*args, **kwargs)

    def _to_device(self, func, args, kwargs) -> bool:
        """A copy to a device of host data (a device tensor moved to its own
        device is no copy)."""
        src = args[1] if func is _T.copy_ and len(args) > 1 else args[0] if args else None
        if not isinstance(src, torch.Tensor) or not self.audit._is_host(src):
            return False
        if func in (_T.cuda, _T.copy_):
            return True
        # Tensor.to(...): a device positional (str / device) or keyword
        if kwargs.get("device") is not None:
            return True
        return any(isinstance(x, (str, torch.device)) for x in args[1:])


class _Ops(TorchDispatchMode):
    def __init__(self, audit: "SyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        a = self.audit
        a.ops += 1
        if a.allocations and any("Tensor" in str(r.type) and r.alias_info is None
                                 for r in func._schema.returns):
            a._record("alloc", f"aten::{name}")
        if name in SYNC_OPS:
            t = next((x for x in args if isinstance(x, torch.Tensor)), None)
            if t is None or not a._is_host(t):
                a._record("sync", f"aten::{name}")
        elif name == "index" and len(args) > 1:
            idx = [i for i in args[1] if isinstance(i, torch.Tensor)]
            if any(i.dtype in (torch.bool, torch.uint8) for i in idx):
                a._record("sync", "aten::index (boolean mask)")
        return func(*args, **kwargs)


@dataclass
class SyncAudit:
    """Context manager: events of the calls made while active (re-entrant use
    over several regions accumulates)."""

    host_tensors: List[torch.Tensor] = field(default_factory=list)
    #: also record every aten op that returns a fresh tensor (kind "alloc")
    allocations: bool = False
    events: List[Event] = field(default_factory=list)
    door_copies: int = 0
    ops: int = 0
    regions: int = 0

    def __post_init__(self):
        self._host = _storages(self.host_tensors)
        self._modes: list = []

    def _is_host(self, t: torch.Tensor) -> bool:
        try:
            return t.untyped_storage().data_ptr() in self._host
        except Exception:  # noqa: BLE001 - tensors without storage (meta, subclasses)
            return False

    def _record(self, kind: str, what: str) -> None:
        where, ours, door, kernel = _caller()
        if kernel:
            return
        if door and kind == "copy":
            self.door_copies += 1
            return
        self.events.append(Event(kind, what, where, ours))

    def ours_of(self, kind: str) -> List[Event]:
        return [e for e in self.events if e.ours and e.kind == kind]

    def ours(self) -> List[Event]:
        return [e for e in self.events if e.ours]

    def theirs(self) -> List[Event]:
        return [e for e in self.events if not e.ours]

    def _maker(self, name: str, orig):
        def make(*args, **kwargs):
            if kwargs.get("device") is not None and str(kwargs["device"]) != "meta":
                self._record("copy", f"{name}(device=)")
            out = orig(*args, **kwargs)
            if kwargs.get("device") is None and isinstance(out, torch.Tensor):
                self._host[out.untyped_storage().data_ptr()] = out  # host data, on the host
            return out
        return make

    def __enter__(self):
        self.regions += 1
        saved = {n: getattr(torch, n) for n in HOST_MAKERS}
        for n, f in saved.items():
            setattr(torch, n, self._maker(n, f))
        fm, om = _Functions(self), _Ops(self)
        fm.__enter__()
        om.__enter__()
        self._modes.append((fm, om, saved))
        return self

    def __exit__(self, *exc):
        fm, om, saved = self._modes.pop()
        om.__exit__(*exc)
        fm.__exit__(*exc)
        for n, f in saved.items():
            setattr(torch, n, f)
        return False


def audit_calls(owner, name: str, audit: SyncAudit, count: Optional[list] = None):
    """Wrap ``owner.name`` so that every call runs inside ``audit``; returns the
    original (to restore with ``setattr``)."""
    orig = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

    def wrapper(*args, **kwargs):
        if count is not None:
            count.append(name)
        with audit:
            return orig(*args, **kwargs)

    wrapper.__wrapped__ = orig
    setattr(owner, name, wrapper)
    return orig
