"""Fused per-row logit statistics and top-K candidates in one read (Triton).

:func:`fused_logit_stats` implements ``entropix_vllm.ops.logit_stats_and_candidates``
for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``).

Algorithm (per row, one pass over the vocabulary in tiles of ``R x G`` logits):

* Statistics. Each tile is loaded once, upcast to float32. The running state is
  ``(m, S0, mu, M2)``: the running max ``m``, ``S0 = sum e^(x - m)``, the
  ``e^(x-m)``-weighted mean ``mu`` of ``d = x - m`` (so ``S1 = S0 * mu``) and
  the weighted centred second moment ``M2 = sum e^d (d - mu)^2`` (so
  ``S2 = M2 + S0 mu^2``). A tile's moments are taken in registers around the
  new max (two passes over the registers: mean, then centred squares) and
  merged with Chan's parallel rule after rescaling the old state by
  ``exp(m_old - m_new)`` (weights), ``mu += m_old - m_new`` (mean shift; M2 is
  shift invariant). Raw second moments are never formed. Then
  ``H = (log S0 - mu) / ln 2`` bits, ``V = M2 / S0 / ln 2^2`` bits^2,
  ``logsumexp = m + log S0``. Entries at ``-inf`` contribute nothing (their
  ``d`` is forced to 0 before multiplying by ``e = 0``); tiles that are all
  ``-inf`` keep the state unchanged. NaN or ``+inf`` entries make ``S0`` NaN,
  which marks the row invalid (NaN statistics, argmax 0).
* Argmax: the lowest id holding the row max, updated only when a tile's max
  strictly exceeds the running max.
* Candidates. The running top-``KP`` list (``KP = max(16, next_pow2(k))``) is
  kept as int64 keys (value, then lower id; see ``_pack_key``) sorted
  descending, starting with filler keys below every real key ("empty
  slots"); ``thr`` is the value of its last key (NaN while slots are empty). A
  tile whose max is ``> thr`` (or any tile while slots are empty) is viewed as
  ``R = KP`` groups of ``G`` consecutive ids; while some group's largest
  remaining key beats the list's last key: the group maxima (others masked to
  the minimum key) are merged into the list (bitonic sort of the group keys,
  elementwise max with the list, bitonic merge; see ``_merge_into_run``), and
  each group's next largest key is found by re-reading the tile (an L1/L2 hit;
  nothing of the tile stays live across the merge). Once the list is warm
  most tiles need one round or none. NaN counts as ``-inf`` here, as in
  ``reference.topk_candidates``; ties keep the lower id.

Two launch layouts:

* ``"row"``: one program per row (large batches).
* ``"split"``: ``NS`` programs per row each over a contiguous vocabulary chunk,
  writing ``(m, S0, mu, M2, argmax)`` and a top-``KP`` key list to small
  partial buffers, then one merge program per row (Chan merge of the partials
  and a bitonic tree merge of the lists). Used when the batch is smaller than
  the number of SMs so that batch 1 spreads over the whole GPU.

No host synchronisation; all buffers have sizes fixed by the shape, so the
launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from entropix_vllm.config import K_MAX
from entropix_vllm.reference import LogitStats

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MAX_SPLITS = 64  # upper bound on vocabulary splits per row (merge kernel size)


# ----------------------------------------------------------------------------
# Sorting-network helpers on int64 keys.
#
# A [N] tensor (N a power of two) is viewed as a hypercube [2] * log2(N); the
# element of flat index i sits at the coordinates given by the bits of i (bit j
# on axis ND - 1 - j). The partner of every element along an axis is
# sum(pair) - h (exact in wrapping int64 arithmetic), a reduction over a size-2
# axis. Only core triton.language primitives are used (and ones the
# interpreter runs as numpy reductions, so the CPU tests stay fast).
# ----------------------------------------------------------------------------
@triton.jit
def _bit_of_index(ND: tl.constexpr, j: tl.constexpr):
    """Bit ``j`` of the flat index, shaped to broadcast over a ``[2]*ND`` cube."""
    y = tl.arange(0, 2)
    for n in tl.static_range(ND):
        if n != ND - 1 - j:
            y = tl.expand_dims(y, n)
    return y


@triton.jit
def _sort_cube(h, LN: tl.constexpr, DESC: tl.constexpr):
    """Full bitonic sort of a ``[2]*LN`` cube (ascending; descending if DESC).

    Compare-exchange along index bit j: the lower index of a pair receives the
    minimum when the pair's direction is ascending (the direction of the blocks
    of size 2**s at stage s is bit s of the index, xored with DESC). Written
    without nested jit calls (each costs ~1 ms under the interpreter).
    """
    for s in tl.static_range(1, LN + 1):
        for i in tl.static_range(s):
            # compare-exchange along index bit j = s - 1 - i
            upper = tl.arange(0, 2)
            for n in tl.static_range(LN):
                if n != LN - s + i:
                    upper = tl.expand_dims(upper, n)
            if s < LN:
                blk = tl.arange(0, 2)
                for n in tl.static_range(LN):
                    if n != LN - 1 - s:
                        blk = tl.expand_dims(blk, n)
                take_max = (upper ^ blk ^ DESC) != 0
            else:
                take_max = (upper ^ DESC) != 0
            partner = tl.sum(h, LN - s + i, keep_dims=True) - h
            h = tl.where(take_max, tl.maximum(h, partner), tl.minimum(h, partner))
    return h


@triton.jit
def _merge_desc_cube(h, LK: tl.constexpr, ND: tl.constexpr):
    """Sort every bitonic run over the ``LK`` innermost bits of a ``[2]*ND`` cube, descending."""
    for i in tl.static_range(LK):
        # compare-exchange along index bit j = LK - 1 - i (cube axis ND - LK + i)
        upper = tl.arange(0, 2)
        for n in tl.static_range(ND):
            if n != ND - LK + i:
                upper = tl.expand_dims(upper, n)
        partner = tl.sum(h, ND - LK + i, keep_dims=True) - h
        h = tl.where(upper == 0, tl.maximum(h, partner), tl.minimum(h, partner))
    return h


@triton.jit
def _merge_into_run(run, key, R: tl.constexpr, LK: tl.constexpr, NET: tl.constexpr):
    """Top ``R`` of ``run`` (``[R]`` keys, descending) and ``key`` (``[R]`` keys,
    any order), descending.

    NET: sort ``key`` ascending with a bitonic network; the elementwise max with
    ``run`` then holds the top R of the union as a bitonic sequence, which a
    bitonic merge sorts (GPU path: O(R log^2 R) work in registers).
    Otherwise: rank every element of the union by a ``[2R, 2R]`` comparison
    (equal keys by position) and place the R best by rank (few, large
    operations: the fast path under the Triton interpreter, where every
    reduction call has a fixed ~ms cost).
    """
    if NET:
        key = tl.reshape(_sort_cube(tl.reshape(key, [2] * LK), LK, 0), [R])
        merged = tl.reshape(tl.maximum(run, key), [2] * LK)
        out = tl.reshape(_merge_desc_cube(merged, LK, LK), [R])
    else:
        u = tl.reshape(tl.join(run, key), [2 * R])
        iu = tl.arange(0, 2 * R)
        before = (u[None, :] > u[:, None]) | ((u[None, :] == u[:, None]) & (iu[None, :] < iu[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)
        sel = rank[:, None] == tl.arange(0, R)[None, :]
        out = tl.sum(tl.where(sel, u[:, None], 0), axis=0)
    return out


@triton.jit
def _pack_key(v, ids):
    """int64 key of (float32 value, int32 id): larger value first, then lower id.

    The float's bits map to an int32 ordered like the float (a negative float
    has its 31 low bits flipped; ``-0.0`` sorts just below ``+0.0``); the low
    32 bits hold ``2**31 - 1 - id``.
    """
    b = v.to(tl.int32, bitcast=True)
    k32 = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (k32.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _key_value(key):
    k32 = (key >> 32).to(tl.int32)
    b = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _key_id(key):
    return 0x7FFFFFFF - key.to(tl.int32)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------
@triton.jit
def _logit_stats_kernel(
    x_ptr, stride_b, V, CHUNK, NS,
    out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
    part_f, part_i, part_k,
    R: tl.constexpr, G: tl.constexpr, LK: tl.constexpr,
    CAND: tl.constexpr, FINAL: tl.constexpr, NET: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Program (row, split): vocabulary ids ``[split*CHUNK, min(V, (split+1)*CHUNK))``.

    FINAL (NS == 1): writes the row's outputs. Otherwise writes partials:
    ``part_f[row, split, 0:4] = (m, S0, mu, M2)``, ``part_i[row, split]`` the
    argmax id and ``part_k[row, split, 0:R]`` the descending top-R keys.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_b
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, V)

    rr = tl.arange(0, R)
    gg = tl.arange(0, G)
    offs2 = rr[:, None] * G + gg[None, :]
    NEG_INF = float("-inf")

    m = tl.max(tl.full([R], NEG_INF, tl.float32), axis=0)
    S0 = tl.sum(tl.zeros([R], tl.float32), axis=0)
    mu = S0
    M2 = S0
    am = tl.sum(tl.zeros([R], tl.int32), axis=0)
    if CAND:
        # key_min: below every key; the list starts with distinct filler keys
        # just above it (their value field decodes to NaN, i.e. "empty slot")
        key_min = tl.full([R], -2147483648, tl.int64) << 32
        run = key_min | (0x7FFFFFFF - rr).to(tl.int64)
        thr = _key_value(tl.min(run, axis=0))  # NaN while the list has empty slots

    if PREFETCH:  # register double buffering: the next tile's load is in flight
        x_next = tl.load(base + lo + offs2, mask=lo + offs2 < hi, other=NEG_INF)
    for start in range(lo, hi, R * G):
        offs = start + offs2
        if PREFETCH:
            x = x_next.to(tl.float32)
            nxt = offs + R * G
            x_next = tl.load(base + nxt, mask=nxt < hi, other=NEG_INF)
        else:
            x = tl.load(base + offs, mask=offs < hi, other=NEG_INF).to(tl.float32)
        xc = tl.where(x != x, NEG_INF, x)
        gmax = tl.max(xc, axis=1)
        tmax = tl.max(gmax, axis=0)

        # argmax: lowest id of the tile max when it beats the running max
        if tmax > m:
            am = tl.min(tl.where(xc == tmax, offs, 2147483647))

        # moments of the tile around the new max, merged with Chan's rule
        m_new = tl.maximum(m, tmax)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        is_ninf = x == NEG_INF
        d = tl.where(is_ninf, 0.0, x - m_use)
        e = tl.where(is_ninf, 0.0, tl.exp2(d * LOG2E))
        s0 = tl.sum(e)
        s1 = tl.sum(d * e)
        mu_t = tl.where(s0 > 0.0, s1 / s0, 0.0)
        c = d - mu_t
        m2_t = tl.sum(e * c * c)
        shift = tl.where(m == NEG_INF, 0.0, m - m_use)
        alpha = tl.exp2(shift * LOG2E)
        S0a = S0 * alpha
        mua = mu + shift
        S0n = S0a + s0
        wb = tl.where(S0n > 0.0, s0 / S0n, 0.0)
        delta = mu_t - mua
        mu = mua + delta * wb
        M2 = M2 * alpha + m2_t + delta * delta * S0a * wb
        S0 = S0n
        m = m_new

        if CAND:
            # a tile can only matter if its max beats the K-th value (equal
            # values cannot: their ids are higher) or the list has empty slots
            if (tmax > thr) | (thr != thr):
                tkey = tl.where(offs < hi, _pack_key(xc, offs), key_min[:, None])
                gk = tl.max(tkey, axis=1)
                thr_k = tl.min(run, axis=0)
                while tl.max(gk, axis=0) > thr_k:
                    run = _merge_into_run(run, tl.where(gk > thr_k, gk, key_min), R, LK, NET)
                    thr_k = tl.min(run, axis=0)
                    # each group's next largest key: re-read the tile (L1/L2
                    # hit) rather than keep it live across the merge
                    xr = tl.load(base + offs, mask=offs < hi, other=NEG_INF).to(tl.float32)
                    xr = tl.where(xr != xr, NEG_INF, xr)
                    tkey = tl.where(offs < hi, _pack_key(xr, offs), key_min[:, None])
                    gk = tl.max(tl.where(tkey < gk[:, None], tkey, key_min[:, None]), axis=1)
                thr = _key_value(thr_k)

    if FINAL:
        bad = S0 != S0
        pos = S0 > 0.0
        log_s0 = tl.log(tl.where(pos, S0, 1.0))
        nan = float("nan")
        lse = tl.where(pos, m + log_s0, NEG_INF)
        ent = tl.where(pos, (log_s0 - mu) / LN2, 0.0)
        vent = tl.where(pos, M2 / tl.where(pos, S0, 1.0) / (LN2 * LN2), 0.0)
        tl.store(out_max + row, tl.where(bad, nan, m))
        tl.store(out_arg + row, tl.where(bad, 0, am).to(tl.int64))
        tl.store(out_lse + row, tl.where(bad, nan, lse))
        tl.store(out_ent + row, tl.where(bad, nan, ent))
        tl.store(out_vent + row, tl.where(bad, nan, vent))
        if CAND:
            ids = _key_id(run)
            ids = tl.where(ids < V, ids, 0)
            vals = _key_value(run)
            vals = tl.where(vals != vals, NEG_INF, vals)  # empty slots
            cm = rr < NC
            tl.store(cand_v + row.to(tl.int64) * NC + rr, vals, mask=cm)
            tl.store(cand_i + row.to(tl.int64) * NC + rr, ids.to(tl.int64), mask=cm)
    else:
        p = row.to(tl.int64) * NS + split
        tl.store(part_f + p * 4 + 0, m)
        tl.store(part_f + p * 4 + 1, S0)
        tl.store(part_f + p * 4 + 2, mu)
        tl.store(part_f + p * 4 + 3, M2)
        tl.store(part_i + p, am)
        if CAND:
            tl.store(part_k + p * R + rr, run)


@triton.jit
def _merge_kernel(
    part_f, part_i, part_k, NS, V,
    out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
    NSP: tl.constexpr, LS: tl.constexpr, KP: tl.constexpr, LK: tl.constexpr,
    CAND: tl.constexpr, NET: tl.constexpr,
):
    """One program per row: merges the row's NS split partials (NSP = 2**LS >= NS)."""
    row = tl.program_id(0)
    NEG_INF = float("-inf")
    s = tl.arange(0, NSP)
    ok = s < NS
    p = row.to(tl.int64) * NS + s
    m_i = tl.load(part_f + p * 4 + 0, mask=ok, other=NEG_INF)
    S0_i = tl.load(part_f + p * 4 + 1, mask=ok, other=0.0)
    mu_i = tl.load(part_f + p * 4 + 2, mask=ok, other=0.0)
    M2_i = tl.load(part_f + p * 4 + 3, mask=ok, other=0.0)
    a_i = tl.load(part_i + p, mask=ok, other=0)

    M = tl.max(m_i, axis=0)
    M_use = tl.where(M == NEG_INF, 0.0, M)
    fin = m_i != NEG_INF
    sh = tl.where(fin, m_i - M_use, 0.0)
    al = tl.where(fin, tl.exp2(sh * LOG2E), 0.0)
    w = al * S0_i
    S0 = tl.sum(w, axis=0)
    pos = S0 > 0.0
    S0_safe = tl.where(pos, S0, 1.0)
    mup = mu_i + sh
    mu = tl.sum(w * mup, axis=0) / S0_safe
    dd = mup - mu
    M2 = tl.sum(al * M2_i + w * dd * dd, axis=0)
    # argmax: the first split (lowest ids) reaching the row max
    first = tl.min(tl.where(m_i == M, s, NSP), axis=0)
    am = tl.sum(tl.where(s == first, a_i, 0), axis=0)

    bad = S0 != S0
    log_s0 = tl.log(S0_safe)
    nan = float("nan")
    lse = tl.where(pos, M + log_s0, NEG_INF)
    ent = tl.where(pos, (log_s0 - mu) / LN2, 0.0)
    vent = tl.where(pos, M2 / S0_safe / (LN2 * LN2), 0.0)
    tl.store(out_max + row, tl.where(bad, nan, M))
    tl.store(out_arg + row, tl.where(bad, 0, am).to(tl.int64))
    tl.store(out_lse + row, tl.where(bad, nan, lse))
    tl.store(out_ent + row, tl.where(bad, nan, ent))
    tl.store(out_vent + row, tl.where(bad, nan, vent))

    if CAND:
        kk = tl.arange(0, KP)
        if NET:
            key_min = tl.full([NSP, KP], -2147483648, tl.int64) << 32
            keys = tl.load(part_k + p[:, None] * KP + kk[None, :], mask=ok[:, None], other=0)
            keys = tl.where(ok[:, None], keys, key_min)
            h = tl.reshape(keys, [2] * (LS + LK))
            # tree merge: at each level list 2i and the reversed list 2i+1 are
            # combined by an elementwise max (top KP of the pair, bitonic), then
            # sorted by a bitonic merge.
            # (the cube has LS - lvl + LK dimensions at level lvl)
            for lvl in tl.static_range(LS):
                r = h
                for j in tl.static_range(LK):
                    r = tl.sum(r, LS - lvl + LK - 1 - j, keep_dims=True) - r
                odd = _bit_of_index(LS - lvl + LK, LK)
                h = tl.where(odd != 0, r, h)
                h = tl.max(h, axis=LS - lvl - 1)
                h = _merge_desc_cube(h, LK, LS - lvl + LK - 1)
            run = tl.reshape(h, [KP])
        else:
            run = tl.load(part_k + (row.to(tl.int64) * NS) * KP + kk)
            for t in range(1, NS):
                other = tl.load(part_k + (row.to(tl.int64) * NS + t) * KP + kk)
                run = _merge_into_run(run, other, KP, LK, NET)
        ids = _key_id(run)
        ids = tl.where(ids < V, ids, 0)
        vals = _key_value(run)
        vals = tl.where(vals != vals, NEG_INF, vals)  # empty slots
        cm = kk < NC
        tl.store(cand_v + row.to(tl.int64) * NC + kk, vals, mask=cm)
        tl.store(cand_i + row.to(tl.int64) * NC + kk, ids.to(tl.int64), mask=cm)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 8 for CPU tensors
    under the Triton interpreter, so that both layouts get exercised there)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return _num_sms(idx)
    return 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan(B: int, V: int, num_candidates: int, device: torch.device, layout: str = "auto",
         num_splits: Optional[int] = None, block: Optional[int] = None,
         num_warps: Optional[int] = None, prefetch: bool = False):
    """Launch plan ``dict(NS, CHUNK, R, G, KP, num_warps, prefetch)`` for a ``[B, V]`` input.

    ``layout``: ``"auto"`` (split when ``B`` is below the SM count), ``"row"``
    or ``"split"``. ``num_splits`` forces the split count (clamped to
    ``1..min(MAX_SPLITS, ceil(V / tile))``); ``block`` forces the tile size
    (a power of two >= KP); ``num_warps`` the warps per program; ``prefetch``
    loads the next tile before working on the current one.
    """
    if layout not in ("auto", "row", "split"):
        raise ValueError(f"layout: expected 'auto', 'row' or 'split', got {layout!r}")
    KP = max(16, _next_pow2(num_candidates)) if num_candidates > 0 else 16
    sms = num_sms(device)
    split = layout == "split" or (layout == "auto" and B < sms)
    if block is None:
        if device.type != "cuda":
            block = 16384  # interpreter: few large tiles (each op has a fixed cost)
        else:
            block = 2048 if split else 4096
    block = max(KP, min(_next_pow2(block), _next_pow2(V)))
    max_ns = max(1, min(MAX_SPLITS, triton.cdiv(V, block)))
    if not split:
        ns = 1
    elif num_splits is not None:
        ns = max(1, min(int(num_splits), max_ns))
    else:
        ns = max(1, min(max_ns, triton.cdiv(2 * sms, max(B, 1))))
    chunk = triton.cdiv(triton.cdiv(V, ns), block) * block
    ns = triton.cdiv(V, chunk)
    if num_warps is None:
        num_warps = 8 if block >= 4096 else 4
    return dict(NS=ns, CHUNK=chunk, R=KP, G=block // KP, KP=KP, num_warps=num_warps,
                prefetch=prefetch)


def fused_logit_stats(logits: torch.Tensor, num_candidates: int = K_MAX, *,
                      layout: str = "auto", num_splits: Optional[int] = None,
                      block: Optional[int] = None, network: Optional[bool] = None,
                      num_warps: Optional[int] = None, prefetch: Optional[bool] = None
                      ) -> Tuple[LogitStats, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One read of ``logits [B, V]`` (float32, float16 or bfloat16; ``V >= 1``;
    rows may be strided, the last dimension must be contiguous or is made so).

    Returns ``(LogitStats, cand_vals, cand_ids)`` exactly as
    ``entropix_vllm.ops.logit_stats_and_candidates``: float32 ``max``,
    ``logsumexp``, ``entropy`` (bits), ``varentropy`` (bits^2) and int64
    ``argmax`` (lowest id on ties), each ``[B]``; all ``-inf`` row: ``-inf``
    max and logsumexp, zero entropy and varentropy, argmax 0; a row with NaN
    or ``+inf``: NaN statistics, argmax 0. ``cand_vals [B, num_candidates]``
    float32 descending (``-inf`` padding, NaN read as ``-inf``) and
    ``cand_ids`` int64 (padding ids are valid ids); ``None, None`` when
    ``num_candidates == 0``.

    ``layout``/``num_splits``/``block``/``num_warps``/``prefetch`` override the launch plan (see
    :func:`plan`); ``network`` picks the candidate-merge implementation
    (bitonic network, the default on CUDA; rank placement, the default under
    the interpreter). Results do not depend on them beyond float32 rounding
    and the ids chosen among tied candidate values.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a [B, V] tensor, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits: expected float32, float16 or bfloat16, got {logits.dtype}")
    if not 0 <= num_candidates <= K_MAX:
        raise ValueError(f"num_candidates: expected 0..{K_MAX}, got {num_candidates}")
    B, V = logits.shape
    if V < 1:
        raise ValueError("logits: the vocabulary dimension must be >= 1")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    out_max = torch.empty(B, **f32)
    out_lse = torch.empty(B, **f32)
    out_ent = torch.empty(B, **f32)
    out_vent = torch.empty(B, **f32)
    out_arg = torch.empty(B, device=dev, dtype=torch.int64)
    NC = int(num_candidates)
    cand = NC > 0
    cand_v = torch.empty((B, NC), **f32) if cand else out_max
    cand_i = torch.empty((B, NC), device=dev, dtype=torch.int64) if cand else out_arg
    stats = LogitStats(out_max, out_arg, out_lse, out_ent, out_vent)
    if B == 0:
        return (stats, cand_v, cand_i) if cand else (stats, None, None)

    p = plan(B, V, NC, dev, layout, num_splits, block, num_warps,
             bool(prefetch) if prefetch is not None else False)
    NS, R, G, KP = p["NS"], p["R"], p["G"], p["KP"]
    LK = KP.bit_length() - 1
    net = bool(logits.is_cuda) if network is None else bool(network)
    if NS == 1:
        _logit_stats_kernel[(B, 1)](
            logits, logits.stride(0), V, p["CHUNK"], 1,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            out_max, out_arg, out_arg,
            R=R, G=G, LK=LK, CAND=cand, FINAL=True, NET=net, PREFETCH=p["prefetch"], num_warps=p["num_warps"])
    else:
        part_f = torch.empty((B, NS, 4), **f32)
        part_i = torch.empty((B, NS), device=dev, dtype=torch.int32)
        part_k = torch.empty((B, NS, KP) if cand else (1,), device=dev, dtype=torch.int64)
        _logit_stats_kernel[(B, NS)](
            logits, logits.stride(0), V, p["CHUNK"], NS,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            part_f, part_i, part_k,
            R=R, G=G, LK=LK, CAND=cand, FINAL=False, NET=net, PREFETCH=p["prefetch"], num_warps=p["num_warps"])
        NSP = _next_pow2(NS)
        _merge_kernel[(B,)](
            part_f, part_i, part_k, NS, V,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            NSP=NSP, LS=NSP.bit_length() - 1, KP=KP, LK=LK, CAND=cand, NET=net,
            num_warps=4 if NSP * KP <= 2048 else 8)
    return (stats, cand_v, cand_i) if cand else (stats, None, None)
