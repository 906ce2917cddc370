"""The C++ CPU ops (csrc/, ``torch.ops.entropix.*``) against the float64
reference (entropix_vllm/reference.py), through the dispatch door
``entropix_vllm.ops`` with ``backend="cpp"``.

Every instruction-set variant the CPU supports ("default", "avx2", "avx512")
runs the logit and attention checks. Inputs are fresh random tensors from fixed
seeds; expectations always come from the reference, never from constants.

The module is skipped only when the extension is not built
(``pip install --no-build-isolation -e .`` builds it; CI does).
"""

from __future__ import annotations

import math

import pytest
import torch

from entropix_vllm import ops, reference, torch_ops

if not ops.cpp_available():  # pragma: no cover - CI builds the extension
    pytest.skip("entropix C++ extension (entropix_vllm._C) is not built; run "
                "`pip install --no-build-isolation -e .`", allow_module_level=True)

E = torch.ops.entropix
ISAS = E.supported_cpu_isas().split(",")
K_MAX = 128


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with one instruction-set variant of the inner loops."""
    previous = E.set_cpu_isa("")
    E.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        E.set_cpu_isa(previous)


@pytest.fixture(params=[1, 4])
def threads(request):
    """1 thread (one task per row) and 4 threads (small batches split a row's
    vocabulary into slices that are merged afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------
# Logit rows
# ----------------------------------------------------------------------------
KINDS = ("gaussian", "peaked", "flat", "masked", "all_neginf", "one_finite", "nan", "posinf",
         "plateau", "ties")


def make_logits(kind: str, B: int, V: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A [B, V] logits tensor of the given kind (values rounded to dtype)."""
    scale = 0.5 + 4.5 * torch.rand((B, 1), generator=g)
    x = torch.randn((B, V), generator=g) * scale
    rows = torch.arange(B)
    if kind == "peaked":  # one logit 20-40 above a Gaussian bulk
        pos = torch.randint(0, V, (B,), generator=g)
        x = torch.randn((B, V), generator=g)
        x[rows, pos] = x.max(-1).values + 20 + 20 * torch.rand(B, generator=g)
    elif kind == "flat":  # equal logits (plus, for half the rows, tiny noise)
        x = torch.full((B, V), 3.25) + 1e-3 * torch.randn((B, V), generator=g) * (rows % 2)[:, None]
    elif kind == "masked":  # most entries -inf, at least one finite
        keep = torch.rand((B, V), generator=g) < 0.2
        keep[rows, torch.randint(0, V, (B,), generator=g)] = True
        x = torch.where(keep, x, torch.full_like(x, -math.inf))
    elif kind == "all_neginf":
        x = torch.full((B, V), -math.inf)
    elif kind == "one_finite":
        x = torch.full((B, V), -math.inf)
        x[rows, torch.randint(0, V, (B,), generator=g)] = torch.randn(B, generator=g) * 10
    elif kind == "nan":  # a NaN in every other row, somewhere
        bad = rows[::2]
        x[bad, torch.randint(0, V, (len(bad),), generator=g)] = math.nan
    elif kind == "posinf":
        bad = rows[::2]
        x[bad, torch.randint(0, V, (len(bad),), generator=g)] = math.inf
    elif kind == "plateau":  # a lone max above a narrow bulk that holds most mass
        x = -5.0 + 0.01 * torch.randn((B, V), generator=g)
        x[rows, torch.randint(0, V, (B,), generator=g)] = 0.0
    elif kind == "ties":  # few distinct values: many ties for the max and the top K
        x = torch.randint(0, 4, (B, V), generator=g).float()
    return x.to(dtype)


def check_logit_stats(x: torch.Tensor, K: int = K_MAX) -> None:
    if K <= K_MAX:  # through the dispatch door
        stats, cv, ci = ops.logit_stats_and_candidates(x, K, backend="cpp")
    else:  # the op itself accepts up to 1024 candidates
        mx, am, lse, ent, vent, cv, ci = E.logit_stats(x.contiguous(), K)
        stats = reference.LogitStats(mx, am, lse, ent, vent)
    ref = reference.logit_stats(x, torch.float64)
    B, V = x.shape

    for name in ("max", "logsumexp", "entropy", "varentropy"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == (B,), name
    assert stats.argmax.dtype == torch.int64
    assert torch.equal(stats.argmax, ref.argmax), (stats.argmax, ref.argmax)
    # max is an input value: exact.
    torch.testing.assert_close(stats.max.double(), ref.max, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats.logsumexp.double(), ref.logsumexp, rtol=1e-6, atol=1e-5,
                               equal_nan=True)
    torch.testing.assert_close(stats.entropy.double(), ref.entropy, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    torch.testing.assert_close(stats.varentropy.double(), ref.varentropy, rtol=1e-4, atol=1e-6,
                               equal_nan=True)

    if K == 0:
        assert cv is None and ci is None
        return
    assert cv.shape == (B, K) and cv.dtype == torch.float32
    assert ci.shape == (B, K) and ci.dtype == torch.int64
    rv, _ = reference.topk_candidates(x, K)
    assert torch.equal(cv, rv), (cv, rv)
    # ids: valid, pointing at their values, distinct among the real candidates
    assert bool(((ci >= 0) & (ci < V)).all())
    xf = torch.where(torch.isnan(x.float()), torch.full_like(x.float(), -math.inf), x.float())
    real = cv > -math.inf
    assert torch.equal(torch.gather(xf, 1, ci)[real], cv[real])
    for b in range(B):
        ids = ci[b][real[b]]
        assert ids.unique().numel() == ids.numel()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logit_stats_kinds(isa, kind, dtype):
    g = torch.Generator().manual_seed(100 * KINDS.index(kind) + dtype.itemsize)
    for B, V in [(5, 1), (9, 7), (16, 1000), (3, 4099)]:
        check_logit_stats(make_logits(kind, B, V, dtype, g))


@pytest.mark.parametrize("V", [32000, 49152, 128256, 151936])
def test_logit_stats_large_vocab(isa, threads, V):
    g = torch.Generator().manual_seed(V)
    for kind, dtype in [("gaussian", torch.float32), ("peaked", torch.bfloat16),
                        ("masked", torch.float16), ("plateau", torch.float32)]:
        check_logit_stats(make_logits(kind, 2, V, dtype, g))


def test_logit_stats_batch_sizes(threads):
    g = torch.Generator().manual_seed(7)
    for B in (1, 2, 3, 17, 64):
        check_logit_stats(make_logits("gaussian", B, 1000, torch.float32, g))
    check_logit_stats(make_logits("peaked", 64, 32000, torch.float32, g))


def test_logit_stats_num_candidates(isa):
    g = torch.Generator().manual_seed(3)
    x = make_logits("gaussian", 6, 3000, torch.float32, g)
    for K in (0, 1, 2, 5, 127, 128, 1024):
        check_logit_stats(x, K)
    # more candidates than entries: -inf padding
    check_logit_stats(make_logits("gaussian", 4, 7, torch.float32, g), 128)


def test_logit_stats_slice_boundaries(threads):
    """Maxima, ties and candidates straddling the vocabulary slices of a row."""
    g = torch.Generator().manual_seed(11)
    V = 151936
    x = torch.randn((2, V), generator=g)
    top = x.max().item() + 1.0
    x[0, [70000, 5, 150000]] = top          # argmax tie: lowest id wins
    x[1, 140000] = top + 30                 # peaked max in the last slice
    x[1, :200] = top + 29                   # ... and many near it in the first
    check_logit_stats(x)
    check_logit_stats(x.bfloat16())
    # ties around the K-th candidate across slices
    y = torch.zeros((1, V))
    y[0, torch.randperm(V, generator=g)[:300]] = 1.0
    check_logit_stats(y)


def test_varentropy_small_and_peaked():
    """varentropy ~1e-3 bits^2 (the branch thresholds' regime) within 1e-4 relative."""
    g = torch.Generator().manual_seed(5)
    V = 128256
    x = torch.randn((8, V), generator=g)
    x[:, 17] = 14.0 + torch.arange(8) * 2.5  # varentropy from ~45 down to ~1e-6
    check_logit_stats(x)
    ref = reference.logit_stats(x)
    assert float(ref.varentropy.min()) < 1e-3 < float(ref.varentropy.max())


def test_fp16_bf16_conversion_exhaustive(isa):
    """Every finite float16 / bfloat16 bit pattern comes back exactly as torch converts it."""
    for dtype in (torch.float16, torch.bfloat16):
        bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
        vals = bits.view(dtype)
        vals = vals[torch.isfinite(vals.float())]
        n = vals.numel() // 128 * 128
        x = vals[:n].reshape(-1, 128)
        cv = E.logit_stats(x, 128)[5]
        expect = torch.sort(x.float(), -1, descending=True).values
        assert torch.equal(cv, expect)


def test_logit_stats_meta_and_errors():
    out = E.logit_stats(torch.empty((3, 50), device="meta"), 16)
    assert [tuple(t.shape) for t in out] == [(3,)] * 5 + [(3, 16)] * 2
    assert out[1].dtype == torch.int64 and out[6].dtype == torch.int64
    with pytest.raises(RuntimeError):
        E.logit_stats(torch.zeros(3), 4)
    with pytest.raises(RuntimeError):
        E.logit_stats(torch.zeros((2, 3), dtype=torch.float64), 4)
    with pytest.raises(RuntimeError):
        E.logit_stats(torch.zeros((2, 3)), -1)
    empty = E.logit_stats(torch.zeros((0, 10)), 8)
    assert empty[0].shape == (0,) and empty[5].shape == (0, 8)


def test_logit_stats_noncontiguous_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn((300, 12), generator=g).t()  # [12, 300], column-major
    check_logit_stats(x)


# ----------------------------------------------------------------------------
# Candidate sampling
# ----------------------------------------------------------------------------
def random_candidates(B: int, K: int, g: torch.Generator):
    """Descending candidate values (some ties, some -inf tails) and distinct ids."""
    v = torch.randn((B, K), generator=g) * (0.2 + 3 * torch.rand((B, 1), generator=g))
    v = torch.where(torch.rand((B, K), generator=g) < 0.1, v.round(), v)  # ties
    v = torch.sort(v, -1, descending=True).values
    n_inf = torch.randint(0, K, (B,), generator=g) * (torch.rand(B, generator=g) < 0.3)
    v = torch.where(torch.arange(K)[None, :] >= K - n_inf[:, None], -math.inf, v)
    ids = torch.randperm(200000, generator=g)[:B * K].reshape(B, K)
    return v, ids


def random_params(B: int, K: int, N: int, g: torch.Generator):
    u = lambda: torch.rand(B, generator=g)  # noqa: E731
    temperature = (0.05 + 2.5 * u()).float()
    top_k = torch.randint(1, K + 1, (B,), generator=g)
    top_k = torch.where(u() < 0.2, torch.ones_like(top_k), top_k)
    top_p = u().clamp_min(1e-3).float()
    top_p = torch.where(u() < 0.15, torch.full_like(top_p, 1e-6), top_p)
    top_p = torch.where(u() < 0.2, torch.ones_like(top_p), top_p)
    min_p = (u() * 0.3).float()
    min_p = torch.where(u() < 0.2, torch.zeros_like(min_p), min_p)
    min_p = torch.where(u() < 0.15, 0.5 + 0.49 * u(), min_p).float()
    n_draws = torch.randint(1, N + 1, (B,), generator=g)
    return temperature, top_k, top_p, min_p, n_draws


@pytest.mark.parametrize("K", [1, 5, 128])
def test_sample_candidates_matches_reference(K):
    g = torch.Generator().manual_seed(K)
    B, N = 64, 5
    for _ in range(25):
        v, ids = random_candidates(B, K, g)
        T, tk, tp, mp, nd = random_params(B, K, N, g)
        noise = torch.empty((B, N, K)).exponential_(generator=g)
        got = ops.sample_candidates(v, ids, T, tk, tp, mp, nd, noise, backend="cpp")
        want = torch_ops.sample_candidates(v, ids, T, tk, tp, mp, nd, noise)
        assert got.dtype == torch.int64 and got.shape == (B,)
        assert torch.equal(got, want), (got != want).nonzero()


def test_sample_candidates_edge_rows():
    g = torch.Generator().manual_seed(1)
    K, N = 8, 3
    v = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # all tied
                      [2.0] + [-math.inf] * 7,                     # one finite
                      [-math.inf] * 8,                             # nothing finite
                      [9.0, 8.9, 8.8, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf]])
    B = v.shape[0]
    ids = torch.stack([torch.randperm(1000, generator=g)[:K] for _ in range(B)])
    for T, tk, tp, mp, nd in [(1.0, 8, 1.0, 0.0, 1), (0.3, 1, 1.0, 0.0, 3), (2.0, 8, 1e-6, 0.0, 2),
                              (1.0, 8, 1.0, 0.99, 3), (5.0, 3, 0.5, 0.1, 1), (1.0, 8, 1.0, 0.0, 7)]:
        full = lambda val, dt: torch.full((B,), val, dtype=dt)  # noqa: E731
        args = (full(T, torch.float32), full(tk, torch.int64), full(tp, torch.float32),
                full(mp, torch.float32), full(nd, torch.int64))
        for _ in range(10):
            noise = torch.empty((B, N, K)).exponential_(generator=g)
            got = ops.sample_candidates(v, ids, *args, noise, backend="cpp")
            want = torch_ops.sample_candidates(v, ids, *args, noise)
            assert torch.equal(got, want)


def test_sample_candidates_distribution():
    """Single draws follow reference.filtered_probs (empirical frequencies)."""
    g = torch.Generator().manual_seed(2024)
    K, n = 16, 40000
    v = torch.sort(torch.randn(K, generator=g) * 1.5, descending=True).values
    ids = torch.arange(100, 100 + K)
    for T, tk, tp, mp in [(1.0, 16, 1.0, 0.0), (0.7, 10, 0.9, 0.03), (1.5, 5, 0.6, 0.0),
                          (1.0, 16, 1.0, 0.2)]:
        vv = v[None].expand(n, K).contiguous()
        noise = torch.empty((n, 1, K)).exponential_(generator=g)
        full = lambda val, dt: torch.full((n,), val, dtype=dt)  # noqa: E731
        tok = ops.sample_candidates(vv, ids[None].expand(n, K).contiguous(), full(T, torch.float32),
                                    full(tk, torch.int64), full(tp, torch.float32),
                                    full(mp, torch.float32), full(1, torch.int64), noise,
                                    backend="cpp")
        freq = torch.bincount(tok - 100, minlength=K).double() / n
        p = reference.filtered_probs(v[None], torch.tensor([T]), torch.tensor([tk]),
                                     torch.tensor([tp]), torch.tensor([mp]))[0]
        sd = torch.sqrt(p * (1 - p) / n)
        assert bool(((freq - p).abs() <= 5 * sd + 1e-12).all()), (freq, p)
        assert bool((freq[p == 0] == 0).all())


def test_sample_candidates_errors():
    v, ids = torch.zeros((2, 4)), torch.zeros((2, 4), dtype=torch.int64)
    one = torch.ones(2)
    with pytest.raises(RuntimeError):  # noise with the wrong K
        E.sample_candidates(v, ids, one, one.long(), one, one * 0, one.long(), torch.ones((2, 1, 3)))
    with pytest.raises(RuntimeError):  # per-row parameter of the wrong length
        E.sample_candidates(v, ids, torch.ones(3), one.long(), one, one * 0, one.long(),
                            torch.ones((2, 1, 4)))


# ----------------------------------------------------------------------------
# Paged attention statistics
# ----------------------------------------------------------------------------
def make_paged(B, H, Hkv, D, block_size, lens, dtype, g, layout="contiguous", index_dtype=torch.int64):
    """A shuffled paged key cache holding B sequences of the given lengths.

    Returns (key_cache [nb, bs, Hkv, D] view, block_table [B, max_blocks],
    seq_lens [B]). Block-table slots past a sequence's end hold -7 (never read).
    """
    need = [(L + block_size - 1) // block_size for L in lens]
    nb = sum(need) + 3
    max_blocks = max(need + [1]) + 1
    if layout == "contiguous":
        kc = torch.randn((nb, block_size, Hkv, D), generator=g).to(dtype)
    elif layout == "kv_pair":  # K and V side by side: kv[..., :D]
        kc = torch.randn((nb, block_size, Hkv, 2 * D), generator=g).to(dtype)[..., :D]
    elif layout == "vllm":  # [nb, Hkv, bs, 2D] transposed, then the K half
        kc = torch.randn((nb, Hkv, block_size, 2 * D), generator=g).to(dtype)
        kc = kc.transpose(1, 2)[..., :D]
    else:  # strided head dim
        kc = torch.randn((nb, block_size, Hkv, D, 2), generator=g).to(dtype)[..., 0]
    perm = torch.randperm(nb, generator=g)
    table = torch.full((B, max_blocks), -7, dtype=torch.int64)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    return kc, table.to(index_dtype), torch.tensor(lens, dtype=index_dtype)


def check_attention(q, kc, table, lens, scale, rtol=1e-5, atol=2e-6):
    got = ops.paged_attention_stats(q, kc, table, lens, scale, backend="cpp")
    keys = [reference.gather_paged(kc, table[b], int(lens[b])) for b in range(q.shape[0])]
    ref = reference.attention_stats(q, keys, scale)
    for name in ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength"):
        a, r = getattr(got, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == (q.shape[0],), name
        torch.testing.assert_close(a.double(), r, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 128])
def test_paged_attention_layouts(isa, ratio, block_size):
    g = torch.Generator().manual_seed(ratio * 1000 + block_size)
    Hkv, D = 2, 64
    H = Hkv * ratio
    lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 0, 37]
    B = len(lens)
    for layout in ("contiguous", "kv_pair", "vllm", "strided"):
        kc, table, sl = make_paged(B, H, Hkv, D, block_size, lens, torch.float32, g, layout)
        q = torch.randn((B, H, D), generator=g) * 2
        check_attention(q, kc, table, sl, D ** -0.5)
    got = ops.paged_attention_stats(q, kc, table, sl, D ** -0.5, backend="cpp")
    zero = sl == 0
    for name in ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength"):
        assert bool((getattr(got, name)[zero] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_half_caches(isa, dtype):
    g = torch.Generator().manual_seed(17)
    B, Hkv, ratio, D, bs = 5, 4, 4, 128, 16
    lens = torch.randint(1, 200, (B,), generator=g).tolist()
    kc, table, sl = make_paged(B, Hkv * ratio, Hkv, D, bs, lens, dtype, g, "vllm", torch.int32)
    q = (torch.randn((B, Hkv * ratio, D), generator=g) * 3).to(dtype)
    check_attention(q, kc, table, sl, D ** -0.5)


def test_paged_attention_peaked_and_long():
    """Sharp attention (large scores) and a long sequence."""
    g = torch.Generator().manual_seed(23)
    B, Hkv, ratio, D, bs = 3, 2, 3, 64, 128
    lens = [2000, 1, 513]
    kc, table, sl = make_paged(B, Hkv * ratio, Hkv, D, bs, lens, torch.float32, g)
    for qscale in (0.3, 4.0):
        q = torch.randn((B, Hkv * ratio, D), generator=g) * qscale
        check_attention(q, kc, table, sl, D ** -0.5)


def test_paged_attention_errors():
    q = torch.randn((1, 4, 8))
    kc = torch.randn((2, 16, 2, 8))
    bt = torch.zeros((1, 1), dtype=torch.int64)
    with pytest.raises(RuntimeError):  # longer than the block table covers
        E.paged_attention_stats(q, kc, bt, torch.tensor([17]), 1.0)
    with pytest.raises(RuntimeError):  # block id out of range
        E.paged_attention_stats(q, kc, torch.tensor([[5]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError):  # heads not a multiple of kv heads
        E.paged_attention_stats(torch.randn((1, 3, 8)), kc, bt, torch.tensor([3]), 1.0)
    out = E.paged_attention_stats(q.to("meta"), kc.to("meta"), bt.to("meta"),
                                  torch.tensor([3]).to("meta"), 1.0)
    assert [tuple(t.shape) for t in out] == [(1,)] * 4


def test_isa_selection_roundtrip():
    previous = E.set_cpu_isa("")
    assert previous in ISAS
    try:
        for name in ISAS:
            assert E.set_cpu_isa(name) == name
        assert E.set_cpu_isa("auto") == ISAS[-1]
        with pytest.raises(RuntimeError):
            E.set_cpu_isa("no-such-isa")
    finally:
        E.set_cpu_isa(previous)
