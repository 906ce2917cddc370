"""triton_kernels.logit_stats.fused_logit_stats against the float64 reference.

Every case draws fresh seeded inputs and compares with
``reference.logit_stats`` (float64, on the same values upcast to float32) and
``reference.topk_candidates``:

* max exactly, argmax exactly (lowest id on ties), logsumexp within
  1e-5 + 1e-6 |lse|, entropy within 1e-5 bits + 1e-5 relative, varentropy
  within 1e-6 bits^2 + 1e-4 relative; NaN exactly where the reference has NaN;
* candidate values equal the reference's top-k values exactly (``-inf``
  padding included); every id is a valid id holding its value; and, beyond
  what ``ops`` promises (ids up to the order among ties), the ids equal a
  stable descending sort's (the lower id first among equal values, NaN read
  as ``-inf``), with id 0 for padding beyond the row's ``V`` entries.

Both launch layouts are forced (one program per row; vocabulary splits plus a
merge kernel), each with both candidate methods (block maxima then a
selection kernel; a scratch buffer kept while streaming), with several tile
sizes. Without CUDA the kernels run in the Triton interpreter on
CPU tensors (``TRITON_INTERPRET=1``, set in conftest.py) with shapes kept
small; with CUDA the same cases run on the GPU plus larger batches, a CUDA
graph capture and a no-host-sync check.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from entropix_vllm import reference  # noqa: E402
from entropix_vllm.contract import K_MAX  # noqa: E402
from entropix_vllm.triton_kernels import logit_stats as tk  # noqa: E402

if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set before triton_kernels was "
                "imported", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
NEG_INF = float("-inf")
KINDS = ("gauss", "wide", "peaked", "peaked_far", "flat", "masked", "all_neg_inf",
         "one_finite", "ties", "two_level")


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------
def make_row(kind: str, V: int, g: torch.Generator) -> torch.Tensor:
    """One float32 row of ``V`` logits of the given kind."""
    x = torch.randn(V, generator=g)
    if kind == "gauss":
        return x * 2.0 + 1.0
    if kind == "wide":
        return x * 8.0 - 3.0
    if kind in ("peaked", "peaked_far"):
        # one logit 20-40 above the rest: varentropy ~1e-3 bits^2 or far smaller
        gap = 20.0 + 20.0 * torch.rand(1, generator=g).item() if kind == "peaked" else 40.0
        i = int(torch.randint(V, (1,), generator=g))
        x[i] = x.max() + gap
        return x
    if kind == "flat":
        return torch.full((V,), 0.25)
    if kind == "masked":
        x = x * 3.0
        drop = torch.rand(V, generator=g) < 0.7
        drop[int(torch.randint(V, (1,), generator=g))] = False
        return x.masked_fill(drop, NEG_INF)
    if kind == "all_neg_inf":
        return torch.full((V,), NEG_INF)
    if kind == "one_finite":
        y = torch.full((V,), NEG_INF)
        y[int(torch.randint(V, (1,), generator=g))] = -3.5
        return y
    if kind == "ties":
        # few distinct values: ties for the max and inside the candidates
        return torch.randint(0, 4, (V,), generator=g).float()
    if kind == "two_level":
        # most mass on many tokens far below the max: moments around the max
        # are large while the varentropy is small (cancellation stress)
        y = torch.full((V,), -12.0) + 1e-3 * x
        y[int(torch.randint(V, (1,), generator=g))] = 0.0
        return y
    raise ValueError(kind)


def make_batch(kinds, V: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([make_row(k, V, g) for k in kinds])
    return x.to(dtype)


# ----------------------------------------------------------------------------
# Comparison with the reference
# ----------------------------------------------------------------------------
def _close(got, want, atol, rtol, what):
    got, want = got.double().cpu(), want.double().cpu()
    nan_w = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan_w), f"{what}: NaN pattern {got} vs {want}"
    g, w = got[~nan_w], want[~nan_w]
    inf = torch.isinf(w)
    assert torch.equal(g[inf], w[inf]), f"{what}: infinities {g[inf]} vs {w[inf]}"
    err = (g[~inf] - w[~inf]).abs()
    bound = atol + rtol * w[~inf].abs()
    if err.numel():
        worst = int(torch.argmax(err - bound))
        assert bool((err <= bound).all()), (
            f"{what}: |{g[~inf][worst].item()} - {w[~inf][worst].item()}| = "
            f"{err[worst].item():.3g} > {bound[worst].item():.3g}")


def check(x: torch.Tensor, num_candidates: int = K_MAX, **kw):
    """Runs the kernel on ``x`` (moved to DEVICE) and asserts it matches the reference."""
    xd = x.to(DEVICE)
    stats, cv, ci = tk.fused_logit_stats(xd, num_candidates, **kw)
    xf = x.float().cpu()
    ref = reference.logit_stats(xf, torch.float64)
    B, V = x.shape
    for f in ("max", "logsumexp", "entropy", "varentropy"):
        t = getattr(stats, f)
        assert t.dtype == torch.float32 and t.shape == (B,), f
    assert stats.argmax.dtype == torch.int64 and stats.argmax.shape == (B,)

    _close(stats.max, ref.max, 0.0, 0.0, "max")
    assert torch.equal(stats.argmax.cpu(), ref.argmax), f"argmax {stats.argmax} vs {ref.argmax}"
    _close(stats.logsumexp, ref.logsumexp, 1e-5, 1e-6, "logsumexp")
    _close(stats.entropy, ref.entropy, 1e-5, 1e-5, "entropy")
    _close(stats.varentropy, ref.varentropy, 1e-6, 1e-4, "varentropy")

    if num_candidates == 0:
        assert cv is None and ci is None
        return stats, cv, ci
    assert cv.shape == (B, num_candidates) and cv.dtype == torch.float32
    assert ci.shape == (B, num_candidates) and ci.dtype == torch.int64
    rv, _ = reference.topk_candidates(xf, num_candidates)
    cvc, cic = cv.cpu(), ci.cpu()
    assert torch.equal(cvc, rv), f"candidate values differ:\n{cvc}\n{rv}"
    assert bool(((cic >= 0) & (cic < V)).all()), "candidate id out of range"
    xs = torch.where(torch.isnan(xf), torch.full_like(xf, NEG_INF), xf)
    held = torch.gather(xs, 1, cic)
    real = cvc > NEG_INF  # -inf padding may carry any valid id (as in the reference)
    assert torch.equal(held[real], cvc[real]), "candidate ids do not hold their values"
    # this kernel's tie order is defined: the lower id first (a stable sort);
    # entries beyond the row's V carry id 0
    kk = min(V, num_candidates)
    want_ids = torch.sort(xs, dim=1, descending=True, stable=True).indices[:, :kk]
    assert torch.equal(cic[:, :kk], want_ids), "ids differ from the lowest-id-first order"
    assert bool((cic[:, kk:] == 0).all())
    return stats, cv, ci


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------
# both launch layouts x both candidate methods (block maxima, the default;
# candidates kept while streaming)
LAYOUTS = [dict(layout=lay, candidates=c, **({"num_splits": 3} if lay == "split" else {}))
           for c in ("blockmax", "stream") for lay in ("row", "split")]
LAYOUT_IDS = [f"{kw['layout']}-{kw['candidates']}" for kw in LAYOUTS]


@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_row_kinds(kw, dtype):
    """Every kind of row in one batch, V = 1000 (several tiles per split on CUDA)."""
    x = make_batch(KINDS, 1000, seed=11 + int(dtype.itemsize), dtype=dtype)
    check(x, **kw)


@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("block", [256, 4096])
def test_adversarial_orders(kw, block):
    """Ascending rows (every tile beats the threshold: the per-tile selection and
    the buffer compaction paths), descending rows, and ties across tiles."""
    g = torch.Generator().manual_seed(block)
    V = 6000
    asc = torch.randn(V, generator=g).sort().values
    desc = asc.flip(0)
    steps = torch.repeat_interleave(torch.arange(30.0), V // 30)  # long runs of ties
    zigzag = torch.where(torch.arange(V) % 2 == 0, asc, desc)
    creep = torch.arange(V) * 1e-5  # each entry beats the earlier ones by a hair
    narrow = 5.0 + 1e-4 * torch.randn(V, generator=g)  # all within a tiny range
    # block maxima: one dense block of large values and many blocks holding a
    # single value just below them (the top blocks by max hold few candidates)
    cluster = torch.randn(V, generator=g)
    cluster[64:96] = 10.0 + torch.rand(32, generator=g)
    cluster[200::37] = 9.0 + 0.5 * torch.rand(len(range(200, V, 37)), generator=g)
    # equal block maxima everywhere: the lower blocks win
    plateau = torch.where(torch.arange(V) % 32 == 5, 3.0, -torch.rand(V, generator=g))
    # signed zeros at the top: -0.0 equals +0.0, so the lower ids come first
    zeros = torch.full((V,), -2.0)
    zpos = torch.randperm(V, generator=g)[:300]
    zeros[zpos] = torch.where(torch.rand(300, generator=g) < 0.5, 0.0, -0.0)
    check(torch.stack([asc, desc, steps, zigzag, creep, narrow, cluster, plateau, zeros]),
          block=block, **kw)


@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
def test_prefetch_and_warps(kw):
    """Launch variants (next-tile prefetch, warps, tile size) give the same results."""
    x = make_batch(("gauss", "masked", "all_neg_inf", "peaked", "flat"), 3000, seed=8,
                   dtype=torch.bfloat16)
    check(x, prefetch=True, block=512, num_warps=2, **kw)


@pytest.mark.parametrize("V", [1, 2, 7, 130, 1000])
@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
def test_small_vocab(V, kw):
    """Vocabularies smaller than the candidate count: -inf padding, valid ids."""
    x = make_batch(("gauss", "ties", "one_finite", "all_neg_inf"), V, seed=V)
    check(x, **kw)


@pytest.mark.parametrize("V", [32000, 49152, 128256, 151936])
@pytest.mark.parametrize("kw", LAYOUTS, ids=LAYOUT_IDS)
def test_large_vocab(V, kw):
    kinds = ("gauss", "peaked") if not CUDA else KINDS
    dtype = torch.bfloat16 if V == 49152 else torch.float32
    check(make_batch(kinds, V, seed=V % 1000, dtype=dtype), **kw)


@pytest.mark.parametrize("V", [262144 + 5, 600001])
def test_vocab_beyond_block_maxima_bound(V):
    """More than MAX_BLOCKS blocks of 32 ids: the blocks grow (64, 128 ids)."""
    p = tk.plan(2, V, K_MAX, torch.device(DEVICE))
    assert p["G"] > 32 and p["NB"] <= tk.MAX_BLOCKS
    kinds = ("gauss", "ties") if not CUDA else ("gauss", "ties", "masked", "peaked")
    check(make_batch(kinds, V, seed=V % 97), layout="row")
    check(make_batch(kinds, V, seed=V % 89, dtype=torch.bfloat16), layout="split",
          num_splits=4)


def test_plan_block_maxima():
    """Blocks of G ids: a power of two, at least a 128-byte line of logits when
    the tile allows, dividing the tile, covering the row in at most MAX_BLOCKS."""
    dev = torch.device(DEVICE)
    for V in (1, 7, 1000, 32000, 128256, 151936, 256000, 262144, 262145, 10**6):
        for itemsize in (2, 4):
            for block in (None, 16, 256):
                p = tk.plan(3, V, K_MAX, dev, block=block, itemsize=itemsize)
                G, NB, BLOCK = p["G"], p["NB"], p["BLOCK"]
                assert G & (G - 1) == 0 and BLOCK % G == 0, p
                assert G >= min(128 // itemsize, BLOCK), p
                assert NB == -(-V // G) and NB <= tk.MAX_BLOCKS and p["NBP"] >= NB, p
                assert p["CMODE"] == 2
    assert tk.plan(3, 1000, 0, dev)["CMODE"] == 0
    assert tk.plan(3, 1000, 5, dev, candidates="stream")["CMODE"] == 1
    with pytest.raises(ValueError, match="candidates"):
        tk.plan(3, 1000, 5, dev, candidates="sort")


def test_padded_vocab_strided_rows():
    """A [B, V] view of a wider buffer (padded vocabulary): row stride > V."""
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(5, 1100, generator=g) * 2
    buf[:, 1000:] = float("nan")  # padding columns must never be read
    x = buf[:, :1000]
    assert x.stride(0) == 1100
    if CUDA:
        x = buf.cuda()[:, :1000]
    for kw in LAYOUTS:
        stats, cv, ci = tk.fused_logit_stats(x, 64, **kw)
        ref = reference.logit_stats(x.float().cpu())
        assert not torch.isnan(stats.entropy).any()
        _close(stats.entropy, ref.entropy, 1e-5, 1e-5, "entropy")
        _close(stats.varentropy, ref.varentropy, 1e-6, 1e-4, "varentropy")
        rv, _ = reference.topk_candidates(x.float().cpu(), 64)
        assert torch.equal(cv.cpu(), rv)


@pytest.mark.parametrize("B", [1, 2, 9, 64])
def test_batches_auto_layout(B):
    """Batches 1..64 with the automatic layout choice (split for small B)."""
    V = 300 if not CUDA else 50000
    g = torch.Generator().manual_seed(B)
    kinds = [KINDS[int(i)] for i in torch.randint(len(KINDS), (B,), generator=g)]
    check(make_batch(kinds, V, seed=100 + B))


@pytest.mark.parametrize("nc", [0, 1, 5, 27, 100])
def test_num_candidates(nc):
    x = make_batch(("gauss", "ties", "masked"), 1000, seed=nc)
    for kw in LAYOUTS:
        check(x, nc, **kw)


def test_nan_and_posinf_rows():
    """NaN / +inf rows: NaN statistics and argmax 0; candidates read NaN as -inf."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 900, generator=g)
    x[0, 17] = float("nan")
    x[1, 850] = float("inf")
    x[2, :] = float("nan")
    x[3, 5] = float("nan")
    x[3, 6] = float("inf")
    x[3, :5] = NEG_INF  # row 4 stays valid
    for kw in LAYOUTS:
        stats, _, _ = check(x, **kw)
        assert torch.isnan(stats.entropy[:4].cpu()).all()
        assert (stats.argmax[:4].cpu() == 0).all()
        assert torch.isfinite(stats.entropy[4].cpu())


def test_all_neg_inf_conventions():
    x = torch.full((2, 500), NEG_INF)
    for kw in LAYOUTS:
        stats, cv, ci = check(x, 8, **kw)
        assert torch.equal(stats.max.cpu(), torch.full((2,), NEG_INF))
        assert torch.equal(stats.entropy.cpu(), torch.zeros(2))
        assert torch.equal(stats.varentropy.cpu(), torch.zeros(2))
        assert torch.equal(stats.argmax.cpu(), torch.zeros(2, dtype=torch.int64))


def test_peaked_varentropy_is_small_and_accurate():
    """One logit 20-40 above the rest: varentropy ~1e-3 bits^2 and below, matched
    to 1e-4 relative (raw second moments would cancel to noise here)."""
    kinds = ("peaked",) * 6 + ("peaked_far",) * 2
    x = make_batch(kinds, 32000, seed=21)
    stats, _, _ = check(x, 16, layout="split", num_splits=2)
    ref = reference.logit_stats(x)
    assert (ref.varentropy < 1e-2).all() and (ref.varentropy[:6] > 1e-12).all()
    rel = (stats.varentropy.double().cpu() - ref.varentropy).abs() / ref.varentropy
    assert (rel < 1e-4).all(), rel


def test_plan_layouts():
    """Split layout for batches below the SM count, one program per row above."""
    dev = torch.device(DEVICE)
    sms = tk.num_sms(dev)
    small = tk.plan(1, 128256, K_MAX, dev)
    large = tk.plan(4 * sms, 128256, K_MAX, dev)
    assert small["NS"] > 1 and large["NS"] == 1
    assert tk.plan(1, 1, K_MAX, dev)["NS"] == 1
    assert tk.plan(2, 1000, 0, dev, layout="row")["NS"] == 1
    with pytest.raises(ValueError):
        tk.fused_logit_stats(torch.zeros(1, 4, device=DEVICE), K_MAX + 1)
    with pytest.raises(TypeError):
        tk.fused_logit_stats(torch.zeros(1, 4, dtype=torch.float64, device=DEVICE), 4)


def test_empty_batch():
    stats, cv, ci = tk.fused_logit_stats(torch.zeros(0, 10, device=DEVICE), 4)
    assert stats.entropy.shape == (0,) and cv.shape == (0, 4) and ci.shape == (0, 4)


# ----------------------------------------------------------------------------
# CUDA only
# ----------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B,V,dtype", [(64, 128256, torch.float32), (256, 32000, torch.bfloat16),
                                       (8, 151936, torch.float16), (1, 256000, torch.float32),
                                       (1024, 4096, torch.float32)])
@pytest.mark.parametrize("candidates", ["blockmax", "stream"])
def test_cuda_large(B, V, dtype, candidates):
    g = torch.Generator().manual_seed(B + V)
    kinds = [KINDS[int(i)] for i in torch.randint(len(KINDS), (B,), generator=g)]
    check(make_batch(kinds, V, seed=B, dtype=dtype), candidates=candidates)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B", [1, 256])
def test_cuda_graph_capture_and_no_sync(B):
    """No host synchronisation; the launch replays from a CUDA graph."""
    V = 128256
    x = make_batch(("gauss",) * B, V, seed=7).cuda()
    tk.fused_logit_stats(x, K_MAX)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tk.fused_logit_stats(x, K_MAX)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            out = tk.fused_logit_stats(x, K_MAX)
    torch.cuda.current_stream().wait_stream(s)
    fresh = make_batch(("peaked", "ties", "masked", "gauss") * ((B + 3) // 4), V, seed=8)[:B]
    x.copy_(fresh.cuda())
    graph.replay()
    torch.cuda.synchronize()
    stats, cv, ci = out
    ref = reference.logit_stats(fresh)
    _close(stats.entropy, ref.entropy, 1e-5, 1e-5, "entropy (graph)")
    _close(stats.varentropy, ref.varentropy, 1e-6, 1e-4, "varentropy (graph)")
    assert torch.equal(stats.argmax.cpu(), ref.argmax)
    rv, _ = reference.topk_candidates(fresh, K_MAX)
    assert torch.equal(cv.cpu(), rv)
