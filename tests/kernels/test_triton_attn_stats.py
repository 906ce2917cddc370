"""triton_kernels.attn_stats against the float64 reference (SPEC section 2).

Every case builds a paged K cache with a shuffled block table, fills every
slot that no sequence owns (tails of last blocks, unused blocks, the block the
unused table entries point to) with NaN, and compares the kernel's figures with
``reference.attention_stats`` on ``reference.gather_paged`` keys in float64.

Tolerances: float32 caches 1e-5 relative + 1e-6 absolute. float16 / bfloat16
caches: 1e-4 relative + 1e-5 absolute (the reference sees the same 16-bit
values, upcast; the kernel accumulates in float32 and, on CUDA with a 16-bit
query, multiplies on the tensor cores).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (set up
below when no conftest does it), with small shapes; with CUDA the same cases
run on the GPU plus larger Llama-like ones.
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
from entropix_vllm.contract import AttnStats  # noqa: E402
from entropix_vllm.triton_kernels import attn_stats as tk  # noqa: E402

if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA and the Triton interpreter is off", allow_module_level=True)

DEV = "cuda" if CUDA else "cpu"
FIELDS = ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5)}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def make_paged(lens, H, HKV, D, BS, cache_dtype=torch.float32, q_dtype=None, layout="plain",
               bt_dtype=torch.int32, len_dtype=torch.int32, spare_blocks=3, key_scale=1.0,
               seed=0):
    """q, K view, block table, seq lens; unowned slots hold NaN.

    layout: "plain" [nb, bs, H_kv, D] contiguous; "cut" K = x[..., :D] of a
    [nb, bs, H_kv, 2D] tensor; "vllm" FlashAttention's view
    [nb, H_kv, bs, 2D].transpose(1, 2).split(D, -1)[0].
    """
    g = torch.Generator().manual_seed(seed)
    q_dtype = q_dtype or cache_dtype
    B = len(lens)
    nblk = [-(-L // BS) for L in lens]
    max_blocks = max(nblk + [1]) + 1  # one more column than needed: unused entries
    n_used = sum(nblk)
    nb = n_used + spare_blocks + 1  # the last block is the "null" block (all NaN)
    null_block = nb - 1
    ids = torch.randperm(nb - 1, generator=g)[:n_used]
    bt = torch.full((B, max_blocks), null_block, dtype=torch.int64)
    pos = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = ids[pos:pos + n]
        pos += n
    base = torch.randn(nb, BS, HKV, D, generator=g, dtype=torch.float64) * key_scale
    owned = torch.zeros(nb, BS, dtype=torch.bool)
    for b, L in enumerate(lens):
        p = torch.arange(L)
        owned[bt[b, p // BS], p % BS] = True
    base[~owned] = float("nan")
    if layout == "plain":
        k = base.to(cache_dtype)
    elif layout == "cut":
        full = torch.randn(nb, BS, HKV, 2 * D, generator=g).to(cache_dtype)
        full[..., :D] = base.to(cache_dtype)
        k = full[..., :D]
    elif layout == "vllm":
        full = torch.randn(nb, HKV, BS, 2 * D, generator=g).to(cache_dtype)
        full[..., :D] = base.transpose(1, 2).to(cache_dtype)
        k = full.transpose(1, 2).split(D, -1)[0]
        assert tuple(k.shape) == (nb, BS, HKV, D) and not k.is_contiguous()
    else:
        raise ValueError(layout)
    q = torch.randn(B, H, D, generator=g).to(q_dtype)
    return (q.to(DEV), k.to(DEV) if layout == "plain" else _to_dev_view(k, layout, D),
            bt.to(bt_dtype).to(DEV), torch.tensor(lens, dtype=len_dtype).to(DEV))


def _to_dev_view(k, layout, D):
    """Move a strided K view to DEV keeping its strides (move the base, re-cut)."""
    if DEV == "cpu":
        return k
    if layout == "cut":
        full = torch.empty(k.shape[:-1] + (2 * D,), dtype=k.dtype)
        full[..., :D] = k
        return full.to(DEV)[..., :D]
    full = torch.empty(k.shape[0], k.shape[2], k.shape[1], 2 * D, dtype=k.dtype)
    full.transpose(1, 2)[..., :D] = k
    return full.to(DEV).transpose(1, 2).split(D, -1)[0]


def reference_stats(q, k, bt, lens, scale) -> AttnStats:
    q, k, bt = q.cpu(), k.cpu(), bt.cpu()
    keys = [reference.gather_paged(k, bt[b], int(lens[b])) for b in range(q.shape[0])]
    return reference.attention_stats(q, keys, scale, dtype=torch.float64)


def assert_close(got: AttnStats, want: AttnStats, dtype, what=""):
    rtol, atol = TOL[dtype]
    for f in FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        assert g.dtype == torch.float32, f
        assert g.shape == w.shape, (f, g.shape, w.shape)
        torch.testing.assert_close(g.cpu().double(), w, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {f}: {m}")


def run_case(lens, H, HKV, D, BS, scale=None, cache_dtype=torch.float32, q_dtype=None,
             tuning=None, what="", **mk):
    q, k, bt, sl = make_paged(lens, H, HKV, D, BS, cache_dtype, q_dtype, **mk)
    scale = D ** -0.5 if scale is None else scale
    got = tk.paged_attention_stats(q, k, bt, sl, scale, **(tuning or {}))
    assert_close(got, reference_stats(q, k, bt, sl, scale), cache_dtype, what)
    return got


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------
SMALL = [
    # (lens, H, H_kv, D, block size, tuning): GQA 3 (SmolLM2), 4 and 1
    ([1, 17, 40, 0, 100], 9, 3, 64, 16, dict(keys_per_split1=32, keys_per_split2=32)),
    ([1, 130, 300, 128], 8, 2, 32, 128, dict(keys_per_split1=128, keys_per_split2=64)),
    ([5, 64, 33], 4, 4, 16, 16, {}),
    ([50, 7, 16], 6, 2, 80, 16, dict(block_n1=16, keys_per_split1=16, block_n2=16)),
]


@pytest.mark.parametrize("case", range(len(SMALL)))
def test_fp32_matches_reference(case):
    lens, H, HKV, D, BS, tuning = SMALL[case]
    run_case(lens, H, HKV, D, BS, tuning=tuning, what=f"case {case}")


def test_int64_tables_and_lengths_and_max_seq_len():
    lens = [33, 1, 0, 70]
    q, k, bt, sl = make_paged(lens, 8, 2, 32, 16, bt_dtype=torch.int64, len_dtype=torch.int64)
    want = reference_stats(q, k, bt, sl, 0.2)
    assert_close(tk.paged_attention_stats(q, k, bt, sl, 0.2), want, torch.float32, "bound")
    assert_close(tk.paged_attention_stats(q, k, bt, sl, 0.2, max_seq_len=max(lens)), want,
                 torch.float32, "max_seq_len")


def test_many_splits():
    """More splits than one merge chunk in both passes (pass 1 merges 16
    partials at a time, pass 2 adds 128 sums at a time)."""
    run_case([2065, 0], 4, 2, 16, 16, tuning=dict(block_n1=64, keys_per_split1=64,
                                                   block_n2=16, keys_per_split2=16),
             what="many splits")


@pytest.mark.parametrize("layout", ["cut", "vllm"])
def test_noncontiguous_key_views(layout):
    run_case([20, 49, 3], 9, 3, 32, 16, layout=layout,
             tuning=dict(keys_per_split1=32, keys_per_split2=16), what=layout)


def test_noncontiguous_query():
    lens = [12, 40]
    q, k, bt, sl = make_paged(lens, 8, 4, 32, 16)
    qq = torch.randn(2, 8, 64, device=DEV)
    qq[..., 1::2] = q  # q as a strided view, last stride 2
    qv = qq[..., 1::2]
    assert not qv.is_contiguous()
    assert_close(tk.paged_attention_stats(qv, k, bt, sl, 0.25),
                 reference_stats(q, k, bt, sl, 0.25), torch.float32, "strided q")


@pytest.mark.parametrize("cache_dtype,q_dtype", [
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
])
def test_half_caches(cache_dtype, q_dtype):
    tuning = dict(keys_per_split1=32, keys_per_split2=32)
    if not CUDA and cache_dtype == torch.float16 and q_dtype == torch.float16:
        tuning["half_dot"] = True  # the 16-bit dot path (the interpreter has no bf16 dot)
    run_case([9, 64, 100, 0], 8, 2, 64, 16, cache_dtype=cache_dtype, q_dtype=q_dtype,
             layout="vllm", tuning=tuning, what=f"{cache_dtype}/{q_dtype}")


def test_peaked_and_shifting_max():
    """Large scores, with later keys larger than earlier ones so the running
    max changes from tile to tile and split to split; near-zero entropies."""
    lens = [90, 45]
    q, k, bt, sl = make_paged(lens, 4, 2, 16, 16, key_scale=3.0, seed=3)
    kc = k.cpu()
    btc = bt.cpu()
    for b, L in enumerate(lens):  # key k grows with its position along a fixed direction
        p = torch.arange(L)
        kc[btc[b, p // 16], p % 16] += (p.double() / 8.0)[:, None, None].to(kc.dtype) \
            * q.cpu()[b, ::2][None, :, :]
    k = kc.to(DEV)
    for scale in (1.0, 8.0):
        want = reference_stats(q, k, bt, sl, scale)
        assert_close(tk.paged_attention_stats(q, k, bt, sl, scale, keys_per_split1=32,
                                              keys_per_split2=16, block_n1=16, block_n2=16),
                     want, torch.float32, f"scale {scale}")


def test_zero_lengths_and_empty_batch():
    q, k, bt, sl = make_paged([0, 0, 0], 4, 2, 16, 16)
    got = tk.paged_attention_stats(q, k, bt, sl, 0.5)
    for f in FIELDS:
        assert torch.equal(getattr(got, f).cpu(), torch.zeros(3))
    got = tk.paged_attention_stats(q[:0], k, bt[:0], sl[:0], 0.5)
    for f in FIELDS:
        assert getattr(got, f).shape == (0,)


def test_deterministic():
    q, k, bt, sl = make_paged([77, 40, 5], 8, 2, 32, 16)
    kw = dict(keys_per_split1=32, keys_per_split2=32)
    a = tk.paged_attention_stats(q, k, bt, sl, 0.3, **kw)
    b = tk.paged_attention_stats(q, k, bt, sl, 0.3, **kw)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("dtype", [d for d in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, d)]
                         + ["uint8"])
def test_quantized_cache_refused(dtype):
    q, k, bt, sl = make_paged([4], 4, 2, 16, 16)
    kq = torch.zeros(k.shape, device=DEV).to(getattr(torch, dtype))
    with pytest.raises(TypeError, match=dtype):
        tk.paged_attention_stats(q, kq, bt, sl, 0.5)


def test_bad_shapes():
    q, k, bt, sl = make_paged([4, 5], 6, 4, 16, 16)  # 6 query heads, 4 kv heads
    with pytest.raises(ValueError, match="multiple"):
        tk.paged_attention_stats(q, k, bt, sl, 0.5)


def test_passes_alone_give_the_figures():
    """Pass 1 (:func:`head_stats`) and pass 2 (:func:`agreement_abs_sum`) run
    alone (what the benchmark times) give the parts of the figures."""
    lens = [30, 0, 75, 1]
    H, HKV, D, BS = 8, 4, 32, 16
    q, k, bt, sl = make_paged(lens, H, HKV, D, BS)
    scale = 0.3
    kw = dict(keys_per_split1=32, keys_per_split2=32, max_seq_len=max(lens))
    want = reference_stats(q, k, bt, sl, scale)
    hs = tk.head_stats(q, k, bt, sl, scale, **kw)
    live = sl.cpu() > 0
    L = sl.cpu().clamp_min(1).double()[live]
    ent = hs.entropy.cpu().double()[live]
    torch.testing.assert_close(ent.mean(1), want.attn_entropy[live], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(((ent - ent.mean(1, keepdim=True)) ** 2).mean(1),
                               want.attn_varentropy[live], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.abs_sum.cpu().double()[live].sum(1) / (H * L),
                               want.interaction_strength[live], rtol=1e-5, atol=1e-6)
    agr = tk.agreement_abs_sum(q, k, bt, sl, scale, hs.lse, **kw).cpu().double()
    torch.testing.assert_close(agr[live] / (H * L), want.agreement[live], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="larger shapes only on CUDA")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H,HKV,D,BS", [(32, 8, 128, 16), (9, 3, 64, 16), (64, 8, 128, 128),
                                        (16, 16, 128, 32)])
def test_cuda_larger(cache_dtype, H, HKV, D, BS):
    g = torch.Generator().manual_seed(H * 1000 + D)
    lens = [1, 16, 17, 511, 0, 4097] + torch.randint(1, 6000, (10,), generator=g).tolist()
    q, k, bt, sl = make_paged(lens, H, HKV, D, BS, cache_dtype, layout="vllm", seed=H + BS)
    scale = D ** -0.5
    want = reference_stats(q, k, bt, sl, scale)
    assert_close(tk.paged_attention_stats(q, k, bt, sl, scale), want, cache_dtype, "bound")
    assert_close(tk.paged_attention_stats(q, k, bt, sl, scale, max_seq_len=max(lens)), want,
                 cache_dtype, "max_seq_len")
