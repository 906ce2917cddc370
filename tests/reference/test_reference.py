"""The float64 oracle (entropix_vllm/reference.py) against hand-derived cases.

Every expected value here comes from a closed form worked out by hand or from
SPEC's written formulas evaluated with plain Python floats; nothing is copied
from the code under test.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from entropix_vllm import reference as R
from entropix_vllm.config import EntropixConfig

LN2 = math.log(2.0)
NEG = -math.inf
DEF = EntropixConfig()


def row(*values):
    return torch.tensor([list(values)], dtype=torch.float64)


def close(a, b, rel=1e-12, abs_=1e-12):
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)


# ----------------------------------------------------------------------------
# SPEC section 1: entropy / varentropy
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1, 2, 7, 100, 49152])
@pytest.mark.parametrize("c", [0.0, -3.7, 1e4])
def test_uniform_rows(V, c):
    s = R.logit_stats(torch.full((2, V), c, dtype=torch.float64))
    for b in range(2):
        assert close(s.entropy[b], math.log2(V), abs_=1e-9)
        assert abs(float(s.varentropy[b])) < 1e-9
        assert int(s.argmax[b]) == 0  # ties: lowest id
        assert close(s.max[b], c)
        assert close(s.logsumexp[b], c + math.log(V), rel=1e-12, abs_=1e-9)


@pytest.mark.parametrize("V,idx,val", [(1, 0, 3.0), (5, 3, -2.5), (1000, 999, 40.0), (1000, 0, 0.0)])
def test_one_hot_rows(V, idx, val):
    x = torch.full((1, V), NEG, dtype=torch.float64)
    x[0, idx] = val
    s = R.logit_stats(x)
    assert float(s.entropy[0]) == 0.0
    assert float(s.varentropy[0]) == 0.0
    assert int(s.argmax[0]) == idx
    assert float(s.max[0]) == val
    assert close(s.logsumexp[0], val)


def _binary(d):
    """Two tokens with logit difference d >= 0: (H bits, V bits^2) in closed form.

    p = 1/(1+e^-d), q = 1-p; log2 p = -log1p(e^-d)/ln2, log2 q = (-d - log1p(e^-d))/ln2;
    H = -(p log2 p + q log2 q); V = p q (log2 p - log2 q)^2 = p q (d/ln2)^2.
    """
    t = math.exp(-d)
    p, q = 1.0 / (1.0 + t), t / (1.0 + t)
    lp = -math.log1p(t) / LN2
    lq = (-d - math.log1p(t)) / LN2
    return -(p * lp + q * lq), p * q * (d / LN2) ** 2


@pytest.mark.parametrize("d", [0.0, 0.5, 2.2, 6.0, 10.0, 25.0, 40.0, 300.0])
@pytest.mark.parametrize("shift", [0.0, 1234.5, -80.0])
def test_two_token_rows_closed_form(d, shift):
    H, V = _binary(d)
    # The pair embedded among masked entries, in both orders.
    x = torch.tensor([[shift, shift - d, NEG, NEG], [NEG, shift - d, NEG, shift]], dtype=torch.float64)
    s = R.logit_stats(x)
    for b in range(2):
        # Absolute accuracy is what the thresholds need: float64 cannot hold 1 + e^-d
        # for d > 36, so a tiny H is only known to ~1e-16 bits.
        assert close(s.entropy[b], H, rel=1e-9, abs_=1e-13), (d, float(s.entropy[b]), H)
        assert close(s.varentropy[b], V, rel=1e-9, abs_=1e-13), (d, float(s.varentropy[b]), V)
    assert [int(a) for a in s.argmax] == [0, 1 if d == 0 else 3]  # a tie goes to the lower id


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 1e-3, 1e-8, 1e-12])
def test_two_token_rows_given_p(p):
    # Logits log p, log(1-p): H = -p log2 p - (1-p) log2(1-p), V = p(1-p) (log2(p/(1-p)))^2.
    q = 1.0 - p
    H = -p * math.log2(p) - q * math.log2(q)
    V = p * q * math.log2(p / q) ** 2
    s = R.logit_stats(row(math.log(p), math.log(q)))
    assert close(s.entropy[0], H, rel=1e-9, abs_=1e-13)
    assert close(s.varentropy[0], V, rel=1e-9, abs_=1e-13)


def test_dyadic_row():
    # p = 1/2, 1/4, 1/8, 1/8: H = 1/2*1 + 1/4*2 + 2*(1/8*3) = 1.75 bits;
    # V = 1/2*(0.75)^2 + 1/4*(0.25)^2 + 2*1/8*(1.25)^2 = 0.6875 bits^2.
    x = row(-1 * LN2, -2 * LN2, -3 * LN2, -3 * LN2, NEG) + 7.0
    s = R.logit_stats(x)
    assert close(s.entropy[0], 1.75)
    assert close(s.varentropy[0], 0.6875)
    assert close(s.logsumexp[0], 7.0)  # the probabilities sum to one before the shift


@pytest.mark.parametrize("V,m", [(10, 3), (64, 1), (5000, 17), (49152, 49151)])
def test_masked_rows_uniform_over_finite_subset(V, m):
    g = torch.Generator().manual_seed(V + m)
    keep = torch.randperm(V, generator=g)[:m]
    x = torch.full((1, V), NEG, dtype=torch.float64)
    x[0, keep] = 2.5
    s = R.logit_stats(x)
    assert close(s.entropy[0], math.log2(m), abs_=1e-9)
    assert abs(float(s.varentropy[0])) < 1e-9
    assert int(s.argmax[0]) == int(keep.min())


def test_bits_vs_independent_nats_moments():
    # H_nats = log S0 - S1/S0, V_nats = S2/S0 - (S1/S0)^2 with max-shifted moments,
    # summed exactly with math.fsum; bits are H_nats/ln2 and V_nats/ln2^2.
    rnd = random.Random(7)
    rows = []
    for scale in (0.1, 1.0, 3.0, 8.0):
        rows.append([rnd.gauss(0.0, scale) for _ in range(257)])
    rows.append([rnd.gauss(0.0, 2.0) if i % 3 else NEG for i in range(257)])
    s = R.logit_stats(torch.tensor(rows, dtype=torch.float64))
    for b, xs in enumerate(rows):
        m = max(xs)
        ds = [v - m for v in xs if v != NEG]
        s0 = math.fsum(math.exp(d) for d in ds)
        s1 = math.fsum(d * math.exp(d) for d in ds)
        s2 = math.fsum(d * d * math.exp(d) for d in ds)
        h_nats = math.log(s0) - s1 / s0
        v_nats = s2 / s0 - (s1 / s0) ** 2
        assert close(float(s.entropy[b]) * LN2, h_nats, rel=1e-10, abs_=1e-12)
        assert close(float(s.varentropy[b]) * LN2 * LN2, v_nats, rel=1e-8, abs_=1e-10)
        assert close(s.logsumexp[b], m + math.log(s0), rel=1e-12)


def test_all_masked_and_invalid_rows():
    x = torch.tensor([
        [NEG, NEG, NEG, NEG],            # all -inf
        [0.0, math.nan, 1.0, 2.0],       # NaN
        [0.0, math.inf, 1.0, 2.0],       # +inf
        [0.0, math.log(3.0), NEG, NEG],  # a valid row beside them: p = 1/4, 3/4
    ], dtype=torch.float64)
    s = R.logit_stats(x)
    # All -inf: max = logsumexp = -inf, entropy = varentropy = 0, argmax 0.
    assert float(s.max[0]) == NEG and float(s.logsumexp[0]) == NEG
    assert float(s.entropy[0]) == 0.0 and float(s.varentropy[0]) == 0.0
    assert int(s.argmax[0]) == 0
    # NaN / +inf: NaN for max, logsumexp, entropy, varentropy; argmax 0.
    for b in (1, 2):
        for name in ("max", "logsumexp", "entropy", "varentropy"):
            assert math.isnan(float(getattr(s, name)[b])), (b, name)
        assert int(s.argmax[b]) == 0
    # The valid row is untouched by its neighbours.
    H = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    V = 0.25 * 0.75 * math.log2(3.0) ** 2
    assert close(s.entropy[3], H) and close(s.varentropy[3], V)
    assert int(s.argmax[3]) == 1 and close(s.logsumexp[3], math.log(4.0))


def test_argmax_ties_lowest_id_and_float32_input():
    x = torch.tensor([[1.0, 5.0, 2.0, 5.0], [NEG, 0.0, 0.0, NEG]], dtype=torch.float32)
    s = R.logit_stats(x)
    assert s.entropy.dtype == torch.float64
    assert [int(a) for a in s.argmax] == [1, 1]
    assert close(s.entropy[1], 1.0)


# ----------------------------------------------------------------------------
# SPEC section 2: attention figures
# ----------------------------------------------------------------------------
def test_attention_identical_keys_uniform():
    H, Hkv, D, L, scale = 6, 2, 4, 9, 0.5
    q = torch.zeros(1, H, D, dtype=torch.float64)
    for h in range(H):
        q[0, h, 0] = h + 1.0  # s_hk = scale*(h+1) for every key
    k = torch.zeros(L, Hkv, D, dtype=torch.float64)
    k[:, :, 0] = 1.0
    a = R.attention_stats(q, [k], scale)
    assert close(a.attn_entropy[0], math.log2(L))
    assert abs(float(a.attn_varentropy[0])) < 1e-12
    assert abs(float(a.agreement[0])) < 1e-12
    assert close(a.interaction_strength[0], scale * (H + 1) / 2)  # mean of scale*(h+1)


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _hb(p):
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_attention_gqa_mapping_and_closed_forms():
    # 4 query heads, 2 kv heads: heads 0,1 read kv head 0, heads 2,3 read kv head 1.
    # Two keys per kv head. kv0: k0 = (a, 0), k1 = 0; kv1: k0 = 0, k1 = (0, b).
    # Heads 0,1 query (1, 0) -> scores (2, 0); heads 2,3 query (0, 1) -> scores (0, 5).
    scale = 0.7
    a, b = 2.0 / scale, 5.0 / scale
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    k = torch.zeros(2, 2, 2, dtype=torch.float64)  # [L, Hkv, D]
    k[0, 0] = torch.tensor([a, 0.0], dtype=torch.float64)
    k[1, 1] = torch.tensor([0.0, b], dtype=torch.float64)
    st = R.attention_stats(q, [k], scale)
    s2, s5 = _sigmoid(2.0), _sigmoid(5.0)
    e01, e23 = _hb(s2), _hb(s5)
    aE = (e01 + e23) / 2
    assert close(st.attn_entropy[0], aE, rel=1e-10)
    assert close(st.attn_varentropy[0], ((e01 - e23) / 2) ** 2, rel=1e-10)
    # Rows (s2, 1-s2) x2 and (1-s5, s5) x2: every |P_hk - mean_h P_hk| = |s2 + s5 - 1| / 2.
    assert close(st.agreement[0], abs(s2 + s5 - 1) / 2, rel=1e-10)
    # |s| over heads and keys: (2 + 0) * 2 + (0 + 5) * 2 over 8 entries.
    assert close(st.interaction_strength[0], 14.0 / 8, rel=1e-10)
    # A mapping h % H_kv would pair head 1 with kv 1: uniform scores, other entropy.
    assert not close(st.attn_entropy[0], (e01 + 1.0 + 1.0 + e23) / 4, rel=1e-6)


@pytest.mark.parametrize("L,delta", [(2, 1.0), (10, 3.0), (100, 8.0), (7, 60.0)])
def test_attention_one_dominant_key(L, delta):
    # One key scores delta, the other L-1 score 0: Z = e^delta + L - 1,
    # e = log2 Z - delta * (e^delta / Z) / ln2, identical for every head.
    H, Hkv, D = 3, 1, 3
    scale = 0.25
    q = torch.zeros(1, H, D, dtype=torch.float64)
    q[0, :, 1] = 2.0
    k = torch.zeros(L, Hkv, D, dtype=torch.float64)
    k[L // 2, 0, 1] = delta / (2.0 * scale)
    st = R.attention_stats(q, [k], scale)
    Z = math.exp(delta) + L - 1
    e = math.log2(Z) - delta * (math.exp(delta) / Z) / LN2
    assert close(st.attn_entropy[0], e, rel=1e-10, abs_=1e-12)
    assert abs(float(st.attn_varentropy[0])) < 1e-12
    assert abs(float(st.agreement[0])) < 1e-12
    assert close(st.interaction_strength[0], delta / L)


def test_attention_padded_keys_respect_seq_lens():
    # Sequence 0 has 3 identical keys then garbage; sequence 1 has 5 identical keys.
    B, H, Hkv, D, Lmax = 2, 2, 1, 2, 6
    q = torch.ones(B, H, D, dtype=torch.float64)
    k = torch.zeros(B, Lmax, Hkv, D, dtype=torch.float64)
    k[0, 3:] = 1e3  # beyond seq_len: must be ignored
    st = R.attention_stats(q, k, 1.0, seq_lens=[3, 5])
    assert close(st.attn_entropy[0], math.log2(3))
    assert close(st.attn_entropy[1], math.log2(5))
    assert float(st.interaction_strength[0]) == 0.0


def test_gather_paged_follows_block_table():
    nb, bs, Hkv, D = 5, 4, 1, 1
    cache = torch.zeros(nb, bs, Hkv, D)
    for blk in range(nb):
        for slot in range(bs):
            cache[blk, slot] = 100 * blk + slot
    table = torch.tensor([3, 0, 4], dtype=torch.int32)
    got = R.gather_paged(cache, table, 10)[:, 0, 0].tolist()
    want = [100 * table[p // bs].item() + p % bs for p in range(10)]
    assert got == want


# ----------------------------------------------------------------------------
# SPEC section 3: branch selection
# ----------------------------------------------------------------------------
EPS = 1e-9
A, I, E, RS, AD = R.ARGMAX, R.INSERT_COT, R.EXPLORE, R.RESAMPLE, R.ADAPTIVE
DEF_C = dataclasses.asdict(DEF)


def branches(pairs, c=DEF_C):
    ent = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    vent = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    return R.select_branch(ent, vent, c).tolist()


def test_defaults_are_the_spec_thresholds():
    assert (DEF.low_ent_thresh, DEF.med_ent_thresh, DEF.high_ent_thresh) == (0.1, 3.0, 5.0)
    assert (DEF.low_vent_thresh, DEF.high_vent_thresh) == (0.1, 5.0)


def _around(t):
    return (t - EPS, t, t + EPS)


def test_argmax_threshold_corner():
    lo_e, at_e, hi_e = _around(0.1)
    lo_v, at_v, hi_v = _around(0.1)
    pairs = [(e, v) for e in (lo_e, at_e, hi_e) for v in (lo_v, at_v, hi_v)]
    want = [A if (e < 0.1 and v < 0.1) else AD for e, v in pairs]
    assert want.count(A) == 1
    assert branches(pairs) == want


def test_insert_threshold_corner():
    pairs = [(e, v) for e in _around(5.0) for v in _around(0.1)]
    want = [I if (e > 5.0 and v < 0.1) else AD for e, v in pairs]
    assert want.count(I) == 1
    assert branches(pairs) == want


def test_explore_and_resample_threshold_corner():
    # ent around 5 (explore needs < 5; resample needs > 3), vent around 5 (both need > 5).
    pairs = [(e, v) for e in _around(5.0) for v in _around(5.0)]
    got = dict(zip(pairs, branches(pairs)))
    for (e, v), b in got.items():
        if v <= 5.0:
            assert b == AD, (e, v)
        elif e < 5.0:
            assert b == E, (e, v)      # explore is checked before resample
        else:
            assert b == RS, (e, v)


def test_med_threshold_only_matters_where_explore_does_not_apply():
    # With the defaults explore (ent < 5) shadows resample for 3 < ent < 5.
    assert branches([(e, 5.0 + EPS) for e in _around(3.0)]) == [E, E, E]
    # Lower high_ent_thresh to 2: resample now decides around ent = 3.
    c = dict(DEF_C, high_ent_thresh=2.0)
    assert branches([(e, 5.0 + EPS) for e in _around(3.0)], c) == [AD, AD, RS]
    assert branches([(1.0, 6.0)], c) == [E]


def test_every_branch_reached_and_plain_python_chain():
    def spec(e, v):
        if e < 0.1 and v < 0.1:
            return A
        if e > 5.0 and v < 0.1:
            return I
        if e < 5.0 and v > 5.0:
            return E
        if e > 3.0 and v > 5.0:
            return RS
        return AD

    rnd = random.Random(3)
    grid = [0.0, 0.05, 0.1, 0.2, 2.9, 3.0, 3.1, 4.99, 5.0, 5.01, 7.0, 12.0]
    pairs = [(e, v) for e in grid for v in grid]
    pairs += [(rnd.uniform(0, 10), rnd.uniform(0, 10)) for _ in range(500)]
    got = branches(pairs)
    assert got == [spec(e, v) for e, v in pairs]
    assert set(got) == {A, I, E, RS, AD}


def test_precedence_when_rules_overlap():
    # Overlapping rules need non-default thresholds; the earlier rule wins.
    c = dict(DEF_C, low_ent_thresh=6.0)             # argmax vs insert: ent 5.5, vent 0.05
    assert branches([(5.5, 0.05)], c) == [A]
    c = dict(DEF_C, low_vent_thresh=6.0)            # insert vs resample: ent 5.5, vent 5.5
    assert branches([(5.5, 5.5)], c) == [I]
    c = dict(DEF_C, low_ent_thresh=6.0, low_vent_thresh=6.0)  # argmax vs explore
    assert branches([(4.0, 5.5)], c) == [A]
    assert branches([(4.0, 5.5)]) == [E]             # explore vs resample (defaults)


def test_per_row_thresholds_as_tensors():
    cfgs = [EntropixConfig(), EntropixConfig(low_ent_thresh=2.5, low_vent_thresh=2.5),
            EntropixConfig(high_ent_thresh=1.5), EntropixConfig(high_vent_thresh=1.0)]
    c = R.config_tensors(cfgs)
    assert c["low_ent_thresh"].shape == (4,)
    ent = torch.full((4,), 2.0, dtype=torch.float64)
    vent = torch.tensor([2.0, 2.0, 0.05, 2.0], dtype=torch.float64)
    # row0 default: adaptive; row1: 2 < 2.5 both -> argmax; row2: 2 > 1.5, vent 0.05 -> insert;
    # row3: vent 2 > 1, ent 2 < 5 -> explore.
    assert R.select_branch(ent, vent, c).tolist() == [AD, A, I, E]


# ----------------------------------------------------------------------------
# SPEC section 3: per-branch parameters (plain-Python evaluation of SPEC's formulas)
# ----------------------------------------------------------------------------
def attn(aE=0.0, aV=0.0, agr=0.0, IS=0.0):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return R.AttnStats(t(aE), t(aV), t(agr), t(IS))


def params(ent, vent, a, cfg=DEF):
    p = R.branch_params(torch.tensor([ent], dtype=torch.float64),
                        torch.tensor([vent], dtype=torch.float64), a, dataclasses.asdict(cfg))
    return (int(p.branch[0]), float(p.temperature[0]), int(p.top_k[0]), float(p.top_p[0]),
            float(p.min_p[0]), int(p.n_draws[0]))


def check(got, want):
    assert got[0] == want[0], (got, want)
    assert close(got[1], want[1], rel=1e-12), (got, want)
    assert got[2] == want[2], (got, want)
    assert close(got[3], want[3], rel=1e-12), (got, want)
    assert close(got[4], want[4], rel=1e-12), (got, want)
    assert got[5] == want[5], (got, want)


def test_argmax_params():
    check(params(0.01, 0.02, attn(3, 1, 0.5, 2)), (A, 0.0, 1, 1.0, 0.0, 1))


@pytest.mark.parametrize("aE,T", [(1.0, 0.666 * 1.5), (3.0, 0.666 * 1.9), (5.0, 1.5)])
def test_insert_cot_params(aE, T):
    # T = min(1.5, T0*(1.3 + 0.2*aE)); aE = 5 gives 0.666*2.3 = 1.5318 -> capped at 1.5.
    assert close(T, min(1.5, 0.666 * (1.3 + 0.2 * aE)))
    check(params(6.0, 0.05, attn(aE=aE, aV=2.0, agr=0.3, IS=4.0)), (I, T, 27, 0.9, 0.03, 1))


@pytest.mark.parametrize("IS,agr,T,K", [
    (0.5, 0.2, 0.666 * 1.35, 37),   # int(27 * 1.4) = int(37.8) = 37
    (2.0, 1.0, 0.666 * 1.8, 27),    # int(27 * 1.0)
    (3.0, 0.0, 0.666 * 2.1, 40),    # int(27 * 1.5) = int(40.5) = 40
    (4.0, 0.5, 1.5, 33),            # 0.666*2.4 = 1.598 -> 1.5; int(27 * 1.25) = int(33.75)
])
def test_explore_params(IS, agr, T, K):
    assert close(T, min(1.5, 0.666 * (1.2 + 0.3 * IS)))
    assert K == max(5, int(27 * (1 + 0.5 * (1 - agr))))
    check(params(2.0, 6.0, attn(aE=1.0, aV=3.0, agr=agr, IS=IS)), (E, T, K, 0.9, 0.03, 1))


def test_explore_min_top_k():
    cfg = EntropixConfig(top_k=3)  # int(3 * 1.5) = 4 < 5 -> 5
    check(params(2.0, 6.0, attn(agr=0.0, IS=0.0), cfg), (E, 0.666 * 1.2, 5, 0.9, 0.03, 1))


@pytest.mark.parametrize("aV,aE,T,P", [
    (0.5, 1.0, 2.0, 0.7),           # 0.666*2.25 = 1.4985 -> 2.0; 0.9 - 0.2 = 0.7
    (4.0, 3.0, 0.666 * 4.0, 0.5),   # 2.664; 0.9 - 0.6 = 0.3 -> 0.5
    (3.0, 0.25, 0.666 * 3.5, 0.85),  # 2.331; 0.9 - 0.05
])
def test_resample_params(aV, aE, T, P):
    assert close(T, max(2.0, 0.666 * (2.0 + 0.5 * aV)))
    assert close(P, max(0.5, 0.9 - 0.2 * aE))
    check(params(6.0, 6.0, attn(aE=aE, aV=aV, agr=0.1, IS=1.0)), (RS, T, 27, P, 0.03, 1))


def _ada(ent, vent, aE, aV, agr, IS):
    LU, AU = ent + vent, aE + aV
    T = 0.666 * (1 + 0.3 * LU + 0.2 * AU - 0.2 * agr)
    P = min(max(0.9 * (1 + 0.1 * aV), 0.1), 1.0)
    K = int(min(max(round(27 * (1 + 0.3 * IS - 0.2 * agr)), 1), 100))
    M = min(max(0.03 * (1 - 0.5 * LU), 0.01), 0.5)
    return T, K, P, M


@pytest.mark.parametrize("ent,vent,aE,aV,agr,IS,want", [
    # LU 1.5, AU 2.3: T = 0.666*1.83; P = 0.9*1.03; K = round(27*1.37 = 36.99) = 37;
    # min_p 0.03*0.25 = 0.0075 -> 0.01.
    (1.0, 0.5, 2.0, 0.3, 0.4, 1.5, (0.666 * 1.83, 37, 0.9 * 1.03, 0.01)),
    # LU 0.2: min_p 0.03*0.9 = 0.027; aV 2 -> P 1.08 -> 1.0; IS 30 -> K huge -> 100.
    (0.15, 0.05, 0.0, 2.0, 0.0, 30.0, (0.666 * (1 + 0.06 + 0.4), 100, 1.0, 0.027)),
    # agr 1, IS 0: K = round(27*0.8 = 21.6) = 22.
    (2.0, 2.0, 1.0, 0.0, 1.0, 0.0, (0.666 * (1 + 1.2 + 0.2 - 0.2), 22, 0.9, 0.01)),
])
def test_adaptive_params(ent, vent, aE, aV, agr, IS, want):
    T, K, P, M = _ada(ent, vent, aE, aV, agr, IS)
    assert close(T, want[0]) and K == want[1] and close(P, want[2]) and close(M, want[3])
    check(params(ent, vent, attn(aE, aV, agr, IS)), (AD, T, K, P, M, 5))


def test_adaptive_params_clip_low_and_custom_config():
    cfg = EntropixConfig(top_k=2, top_p=0.05, n_adaptive_samples=3, ada_top_p_min=0.2)
    # K = round(2 * (1 - 0.2)) = round(1.6) = 2; with agr 1 and IS 0: round(2*0.8) = 2;
    # top_p = 0.05 * 1 -> clipped to 0.2.
    got = params(1.0, 1.0, attn(aE=0.0, aV=0.0, agr=1.0, IS=0.0), cfg)
    check(got, (AD, 0.666 * (1 + 0.6 - 0.2), 2, 0.2, 0.01, 3))


# ----------------------------------------------------------------------------
# SPEC section 4: one sampling step
# ----------------------------------------------------------------------------
P5 = [0.4, 0.3, 0.2, 0.06, 0.04]


def kept(logits, T, k, p, m):
    t = lambda v, dt=torch.float64: torch.tensor([v], dtype=dt)  # noqa: E731
    f = R.filter_logits(logits, t(T), t(k, torch.int64), t(p), t(m))
    return [i for i in range(logits.shape[1]) if math.isfinite(float(f[0, i]))], f


def test_filter_top_p_after_top_k_on_renormalised_survivors():
    x = torch.log(torch.tensor([P5], dtype=torch.float64))
    # SPEC order: top_k 3 -> (4/9, 3/9, 2/9); mass before token 2 is 7/9 >= 0.75 -> {0, 1}.
    # top_p first on the full row would keep {0, 1, 2} (mass before token 2 is 0.7 < 0.75).
    ids, f = kept(x, 1.0, 3, 0.75, 0.0)
    assert ids == [0, 1]
    assert torch.allclose(f[0, :2], x[0, :2])


def test_filter_min_p_before_top_p_and_relative_to_max():
    x = torch.log(torch.tensor([P5], dtype=torch.float64))
    # min_p 0.2 keeps p >= 0.08: {0,1,2}, renormalised (4/9, 3/9, 2/9); top_p 0.75 -> {0, 1}.
    # top_p first: {0,1,2}, then min_p: {0,1,2}.
    assert kept(x, 1.0, 100, 0.75, 0.2)[0] == [0, 1]
    # min_p is relative to the max probability: 0.45 * 0.4 = 0.18 -> {0, 1, 2}
    # (an absolute threshold of 0.45 would keep nothing).
    assert kept(x, 1.0, 100, 1.0, 0.45)[0] == [0, 1, 2]
    # top_p 1 and min_p 0 keep everything finite.
    assert kept(x, 1.0, 100, 1.0, 0.0)[0] == [0, 1, 2, 3, 4]


def test_filter_temperature_first():
    x = torch.log(torch.tensor([P5], dtype=torch.float64))
    # T = 2: p_i^(1/2) relative to the max >= 0.6  <=>  p_i >= 0.36 * 0.4 = 0.144 -> {0,1,2};
    # min_p before temperature (p_i >= 0.24) would give {0, 1}.
    ids, f = kept(x, 2.0, 100, 1.0, 0.6)
    assert ids == [0, 1, 2]
    assert torch.allclose(f[0, :3], x[0, :3] / 2)
    assert kept(x, 1.0, 100, 1.0, 0.6)[0] == [0, 1]


def test_filter_ties_masks_and_minimum_one_token():
    flat = torch.zeros(1, 6, dtype=torch.float64)
    assert kept(flat, 1.0, 2, 1.0, 0.0)[0] == [0, 1]          # ties: lower ids first
    assert kept(flat, 1.0, 6, 0.5, 0.0)[0] == [0, 1, 2]        # before-mass 0, 1/6, 2/6 < 0.5
    x = torch.log(torch.tensor([P5], dtype=torch.float64))
    assert kept(x, 1.0, 100, 1e-9, 0.0)[0] == [0]              # top_p tiny: the most probable
    m = torch.tensor([[NEG, 0.0, NEG, -1.0, NEG]], dtype=torch.float64)
    assert kept(m, 1.0, 5, 1.0, 0.0)[0] == [1, 3]              # masked never kept


def test_filtered_probs_and_race_distribution():
    x = torch.log(torch.tensor([P5 + [0.0]], dtype=torch.float64))  # last token masked
    t = lambda v, dt=torch.float64: torch.tensor([v], dtype=dt)  # noqa: E731
    probs = R.filtered_probs(x, t(1.0), t(3, torch.int64), t(1.0), t(0.0))[0]
    assert torch.allclose(probs, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0, 0, 0], dtype=torch.float64))
    # Exponential race with Exp(1) noise: empirical frequencies match, with the
    # distribution flattened by T = 1.7 (p_i^(1/T), renormalised) as the target.
    T = 1.7
    f = R.filter_logits(x, t(T), t(4, torch.int64), t(1.0), t(0.0))
    target = [P5[i] ** (1 / T) if i < 4 else 0.0 for i in range(6)]
    target = [v / sum(target) for v in target]
    N = 200_000
    g = torch.Generator().manual_seed(1234)
    noise = torch.empty(N, 6, dtype=torch.float64).exponential_(generator=g)
    toks = R.race(f.expand(N, 6), noise)
    freq = torch.bincount(toks, minlength=6).double() / N
    for i in range(6):
        sd = math.sqrt(target[i] * (1 - target[i]) / N)
        assert abs(float(freq[i]) - target[i]) <= 5 * sd + 1e-12, (i, float(freq[i]), target[i])
    assert float(freq[4]) == 0.0 and float(freq[5]) == 0.0


def _bp(branch, T=1.0, k=100, p=1.0, m=0.0, n=1, B=1):
    full = lambda v, dt=torch.float64: torch.full((B,), v, dtype=dt)  # noqa: E731
    return R.BranchParams(branch=full(branch, torch.int64), temperature=full(T),
                          top_k=full(k, torch.int64), top_p=full(p), min_p=full(m),
                          n_draws=full(n, torch.int64))


def test_insert_cot_emits_and_falls_back():
    V, cot = 64, 40
    x = torch.zeros(3, V, dtype=torch.float64)  # uniform: 6 bits, varentropy 0 -> insert
    x[2, cot] = NEG                              # row 2: the CoT token is masked
    ent = R.logit_stats(x).entropy
    p = R.branch_params(ent, R.logit_stats(x).varentropy, R.AttnStats.zeros(3, dtype=torch.float64),
                        dataclasses.asdict(DEF))
    assert p.branch.tolist() == [I, I, I]
    cot_t = torch.full((3,), cot, dtype=torch.int64)
    prev = torch.tensor([False, True, False])
    # Fallback on the uniform row of 64: top_k 27 keeps ids 0..26 (ties by id), then
    # top_p 0.9 over 27 equal tokens keeps i with i/27 < 0.9: ids 0..24 (min_p keeps all).
    g = torch.Generator().manual_seed(5)
    seen = set()
    for _ in range(200):
        noise = torch.empty(3, 1, V, dtype=torch.float64).exponential_(generator=g)
        out = R.sample_step(x, p, noise, cot_token=cot_t, prev_is_cot=prev).tolist()
        assert out[0] == cot
        assert 0 <= out[1] <= 24 and 0 <= out[2] <= 24
        seen.update(out[1:])
    assert len(seen) > 15  # really sampled
    # A CoT id outside the vocabulary is not allowed either.
    noise = torch.empty(3, 1, V, dtype=torch.float64).exponential_(generator=g)
    out = R.sample_step(x, p, noise, cot_token=torch.full((3,), V + 5), prev_is_cot=None).tolist()
    assert all(0 <= o <= 24 for o in out)


def test_adaptive_best_of_n_picks_highest_raw_logit():
    x = torch.tensor([[0.5, 2.0, -1.0, 1.5, 2.0, 0.0, -3.0, 1.0]], dtype=torch.float64)
    V = x.shape[1]

    def noise_for(draws, N=5):
        # Draw j wins at token draws[j]: Exp noise near 0 there makes -log(noise) huge.
        nz = torch.ones(1, N, V, dtype=torch.float64)
        for j, tok in enumerate(draws):
            nz[0, j, tok] = 1e-200
        return nz

    p = _bp(AD, n=5)
    assert R.sample_step(x, p, noise_for([0, 3, 7, 2, 5])).tolist() == [3]   # logit 1.5
    assert R.sample_step(x, p, noise_for([2, 4, 1, 0, 3])).tolist() == [4]   # tie 2.0: first drawn
    assert R.sample_step(x, p, noise_for([2, 1, 4, 0, 3])).tolist() == [1]
    # Only the first n_draws draws count.
    assert R.sample_step(x, _bp(AD, n=2), noise_for([5, 0, 1, 4, 3])).tolist() == [0]
    # Argmax rows ignore the noise.
    assert R.sample_step(x, _bp(A, T=0.0, k=1, n=1), noise_for([7, 3, 0])).tolist() == [1]


def test_seed_reproducibility():
    V, B = 1000, 2
    x = torch.zeros(B, V, dtype=torch.float64)  # flat rows
    p = _bp(E, T=1.0, k=V, p=1.0, m=0.0, B=B)

    def run(seeds, steps=20):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        toks = []
        for _ in range(steps):
            noise = R.generator_noise((B, 1, V), gens, dtype=torch.float64)
            toks.append(R.sample_step(x, p, noise).tolist())
        return toks

    a, b, c = run([11, 22]), run([11, 22]), run([11, 23])
    assert a == b
    assert [t[0] for t in a] == [t[0] for t in c]   # row 0: same seed, same draws
    assert [t[1] for t in a] != [t[1] for t in c]   # row 1: other seed, other draws
    assert len({t[0] for t in a}) > 10              # a flat row really spreads
