"""The attention figures into a caller's buffer with a preallocated workspace
(``ops.paged_attention_stats(..., out=, workspace=)``, ``ops.attention_workspace``):
what a CUDA-graph capture of the per-step figures needs.

* Every backend (Triton under the interpreter on CPU, the C++ op, torch)
  takes the same arguments and writes the float64 reference's figures
  (``reference.attention_stats``; tolerances of ``test_triton_attn_stats.py``)
  into columns ``0..B-1`` of ``out``, leaving the other columns alone, and
  returns views of ``out``.
* One Triton workspace serves calls of any batch size up to its capacity, in
  any order: its arrival counters are back at zero after every call (the
  kernels reset them), rows with no keys get zeros although ``out`` held NaN.
* A Triton call with ``out`` and ``workspace`` allocates no tensor and reads
  nothing back to the host: under a ``TorchDispatchMode`` the launcher's own
  host code issues no op that returns a fresh tensor and no
  ``aten::_local_scalar_dense`` (ops the interpreter itself runs to execute
  a kernel on CPU are not counted: on a GPU a launch runs no torch op).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from entropix_vllm import ops, reference  # noqa: E402
from entropix_vllm.contract import AttnWorkspace  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
FIELDS = ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5)}
H, HKV, D, BS, WIDTH = 6, 2, 32, 16, 8  # 128 keys of capacity per request


def _backends():
    out = ["torch"]
    if ops.cpp_available() and not CUDA:
        out.append("cpp")
    if ops.triton_available() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


BACKENDS = _backends()


def make_cache(num_blocks=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(num_blocks, HKV, BS, 2 * D, generator=g).to(dtype)
    return full.to(DEV).transpose(1, 2).split(D, -1)[0]  # vLLM's strided K view


def make_batch(lens, cap, num_blocks=64, dtype=torch.float32, seed=0):
    """Capacity-sized buffers (as the integration keeps them) holding a batch."""
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.zeros(cap, H, D, dtype=dtype, device=DEV)
    bt = torch.zeros(cap, WIDTH, dtype=torch.int32, device=DEV)
    sl = torch.zeros(cap, dtype=torch.int32, device=DEV)
    B = len(lens)
    q[:B] = torch.randn(B, H, D, generator=g).to(dtype).to(DEV)
    bt[:B] = torch.randperm(num_blocks, generator=g)[:B * WIDTH].view(B, WIDTH).to(bt)
    sl[:B] = torch.tensor(lens, dtype=torch.int32)
    return q, bt, sl


def reference_stats(q, k, bt, sl, scale):
    q, k, bt, sl = q.cpu(), k.cpu(), bt.cpu(), sl.cpu()
    keys = [reference.gather_paged(k, bt[b], int(sl[b])) for b in range(q.shape[0])]
    return reference.attention_stats(q, keys, scale, dtype=torch.float64)


def assert_matches(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f).cpu().double(), getattr(want, f), rtol=rtol,
                                   atol=atol, msg=lambda m: f"{what} {f}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_workspace_match_the_reference(backend):
    cap = 7
    k = make_cache()
    ws = ops.attention_workspace(cap, H, HKV, DEV, backend=backend)
    assert isinstance(ws, AttnWorkspace) and ws.backend == backend
    out = torch.full((4, cap + 2), 123.0, device=DEV)
    scale = D ** -0.5
    # several steps of different batch sizes through the same buffers
    for step, lens in enumerate(([5, 128, 0, 77], [1], [0, 0, 64, 3, 100, 17, 128], [40, 0])):
        q, bt, sl = make_batch(lens, cap, seed=step)
        B = len(lens)
        out[:, :cap].fill_(float("nan"))  # stale figures: every row must be written
        got = ops.paged_attention_stats(q[:B], k, bt[:B], sl[:B], scale, backend=backend,
                                        out=out, workspace=ws)
        want = reference_stats(q[:B], k, bt[:B], sl[:B], scale)
        assert_matches(got, want, torch.float32, f"{backend} step {step}")
        for i, f in enumerate(FIELDS):  # views of out's first B columns
            t = getattr(got, f)
            assert t.data_ptr() == out[i].data_ptr() and t.shape == (B,)
        assert torch.isnan(out[:, B:cap]).all() and (out[:, cap:] == 123.0).all()
        zero = (sl[:B] == 0).cpu()
        assert (out[:, :B].cpu()[:, zero] == 0).all()
        if ws.counters is not None:
            assert not ws.counters.any(), "the arrival counters must be left at zero"
        plain = ops.paged_attention_stats(q[:B], k, bt[:B], sl[:B], scale, backend=backend)
        assert_matches(plain, want, torch.float32, f"{backend} without out")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_caches_into_out(dtype):
    cap = 3
    k = make_cache(dtype=dtype)
    ws = ops.attention_workspace(cap, H, HKV, DEV, backend="triton")
    out = torch.empty(4, cap, device=DEV)
    q, bt, sl = make_batch([33, 0, 96], cap, dtype=dtype)
    got = ops.paged_attention_stats(q, k, bt, sl, 0.2, backend="triton", out=out, workspace=ws)
    assert_matches(got, reference_stats(q, k, bt, sl, 0.2), dtype, str(dtype))


def test_bad_out_and_workspace_refused():
    k = make_cache()
    q, bt, sl = make_batch([4, 5], 2)
    with pytest.raises(ValueError, match=r"out: expected a float32 \[4, >= 2\]"):
        ops.paged_attention_stats(q, k, bt, sl, 0.5, backend="torch", out=torch.empty(4, 1))
    with pytest.raises(ValueError, match="out: expected"):
        ops.paged_attention_stats(q, k, bt, sl, 0.5, backend="torch",
                                  out=torch.empty(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ops.attention_workspace(4, 6, 4, "cpu", backend="torch")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_triton_workspace_checks():
    k = make_cache()
    q, bt, sl = make_batch([4, 5, 6], 3)
    out = torch.empty(4, 3, device=DEV)
    small = ops.attention_workspace(2, H, HKV, DEV, backend="triton")
    with pytest.raises(ValueError, match="<= 2 requests"):
        ops.paged_attention_stats(q, k, bt, sl, 0.5, backend="triton", out=out, workspace=small)
    other = ops.attention_workspace(3, H, H, DEV, backend="triton")
    with pytest.raises(ValueError, match="kv"):
        ops.paged_attention_stats(q, k, bt, sl, 0.5, backend="triton", out=out, workspace=other)
    torch_ws = ops.attention_workspace(3, H, HKV, DEV, backend="torch")
    with pytest.raises(ValueError, match="'torch' backend"):
        ops.paged_attention_stats(q, k, bt, sl, 0.5, backend="triton", out=out,
                                  workspace=torch_ws)
    from entropix_vllm.triton_kernels import attn_stats
    ws = ops.attention_workspace(3, H, HKV, DEV, backend="triton")
    with pytest.raises(ValueError, match="partial rows"):  # a tuning override with more splits
        attn_stats.paged_attention_stats(q, k, bt, sl, 0.5, out=out, workspace=ws,
                                         keys_per_split1=16, keys_per_split2=16)


# ----------------------------------------------------------------------------
# No allocation, no host sync
# ----------------------------------------------------------------------------
SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero")


class _HostOps(TorchDispatchMode):
    """Records the ops the host code issues, minus what a kernel launch runs
    inside the Triton interpreter."""

    def __init__(self):
        super().__init__()
        self.allocating, self.syncing, self.all = [], [], []
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            name = func._schema.name.split("::")[-1]
            self.all.append(name)
            if any("Tensor" in str(r.type) and r.alias_info is None
                   for r in func._schema.returns):
                self.allocating.append(str(func))
            if name in SYNC_OPS:
                self.syncing.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif("triton" not in BACKENDS or CUDA, reason="the interpreter's launch path")
def test_triton_call_with_out_and_workspace_allocates_nothing_and_never_syncs(monkeypatch):
    from triton.runtime import interpreter

    cap = 5
    k = make_cache()
    ws = ops.attention_workspace(cap, H, HKV, DEV, backend="triton")
    out = torch.zeros(4, cap)
    q, bt, sl = make_batch([9, 128, 0, 50], cap)
    args = (q[:4], k, bt[:4], sl[:4], D ** -0.5)
    ops.paged_attention_stats(*args, backend="triton", out=out, workspace=ws)  # warm (plan)

    mode = _HostOps()
    launches = []
    run = interpreter.InterpretedFunction.run

    def kernel_run(self, *a, **kw):
        launches.append(self.fn.__name__)
        mode.in_kernel += 1
        try:
            return run(self, *a, **kw)
        finally:
            mode.in_kernel -= 1

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", kernel_run)
    with mode:
        got = ops.paged_attention_stats(*args, backend="triton", out=out, workspace=ws)
    assert launches == ["_head_partials_kernel", "_agreement_kernel"]
    assert mode.allocating == [], mode.allocating
    assert mode.syncing == [], mode.syncing
    assert mode.all, "the dispatch mode saw no op at all (views are expected)"
    assert_matches(got, reference_stats(*args), torch.float32, "recorded call")

    # the check can fail: a call without out/workspace allocates
    mode2 = _HostOps()
    with mode2:
        ops.paged_attention_stats(*args, backend="triton")
    assert mode2.allocating
