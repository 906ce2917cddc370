"""Fused per-row logit statistics and top-K candidates in one read (Triton).

:func:`fused_logit_stats` implements ``entropix_vllm.ops.logit_stats_and_candidates``
for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``, where the
very same kernels run in the Triton interpreter).

Algorithm (per row, one pass over the vocabulary in tiles of ``BLOCK`` logits):

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
* Candidates (``k = num_candidates``). Every logit is an int64 key (its value,
  then the lower id; see ``_pack_key``): the top ``k`` keys are the answer,
  ties resolved to the lower id. Each program appends, in id order, the keys
  of the entries that can still make its top ``k`` to a small scratch buffer
  (``CAP`` keys, L2 resident): every entry while fewer than ``k`` are held,
  afterwards only entries ``> thr``, where ``thr`` is a value that at least
  ``k`` held entries reach (equal values cannot qualify later: their ids are
  higher). A tile whose max is ``<= thr`` costs nothing more; positions come
  from a prefix sum of the append mask. When a tile would add more than
  ``CAP - k`` keys (the first tile), its own top ``k`` is selected first; when
  the buffer would overflow it is compacted to its top ``k``. Selection
  (``_select``) bisects the 32-bit value field for the k-th largest value
  (about 30 counting reductions, no sorting) and keeps the lowest-id entries
  among ties by a prefix sum; ``thr`` becomes that value. At the end the held
  keys are selected once more and sorted by rank (each key's rank is the
  number of larger keys, counted in chunks) straight into the output. NaN
  counts as ``-inf``, as in ``reference.topk_candidates``.

Two launch layouts:

* ``"row"``: one program per row (large batches).
* ``"split"``: ``NS`` programs per row each over a contiguous vocabulary chunk,
  writing ``(m, S0, mu, M2, argmax)`` and their top-``k`` keys to small partial
  buffers, then one merge program per row (Chan merge of the partials;
  selection and rank sort of the ``NS * k`` keys). Used when the batch is
  smaller than the number of SMs so that batch 1 spreads over the whole GPU.

No host synchronisation; all buffers have sizes fixed by the shape, so the
launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
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
# Keys and selection
# ----------------------------------------------------------------------------
@triton.jit
def _pack_key(v, ids):
    """int64 key of (float32 value, int32 id): larger value first, then lower id.

    The float's bits map to an int32 ordered like the float (a negative float
    has its 31 low bits flipped; ``-0.0`` sorts just below ``+0.0``); the low
    32 bits hold ``2**31 - 1 - id``.
    """
    return (_k32(v).to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _k32_value(k32):
    """float32 value of the high half (an int32) of a key."""
    b = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _key_value(key):
    return _k32_value((key >> 32).to(tl.int32))


@triton.jit
def _key_id(key):
    return 0x7FFFFFFF - key.to(tl.int32)


@triton.jit
def _k32(v):
    """int32 ordered like the float32 ``v`` (the high half of its key)."""
    b = v.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_exact(keys, valid, K):
    """The ``K`` largest valid int64 keys of a 1-D tensor (any order).

    Returns ``keep`` marking ``min(K, #valid)`` entries. The K-th largest value
    field is found by bisection over the int32 value field (each step one
    counting reduction); when more entries equal it than places remain, a
    second bisection over the id field keeps the lowest ids.
    """
    k32 = (keys >> 32).to(tl.int32)
    nvalid = tl.sum(valid.to(tl.int32), axis=0)
    lo = tl.min(tl.where(valid, k32, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, k32, -2147483647), axis=0)
    hi = tl.where(nvalid > K, hi, lo)
    # invariant: at least K valid entries have a value field >= lo
    while lo < hi:
        mid = ((lo.to(tl.int64) + hi.to(tl.int64) + 1) >> 1).to(tl.int32)
        c = tl.sum((valid & (k32 >= mid)).to(tl.int32), axis=0)
        up = c >= K
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    gt = valid & (k32 > lo)
    eq = valid & (k32 == lo)
    quota = K - tl.sum(gt.to(tl.int32), axis=0)
    low = keys.to(tl.int32)  # 2**31 - 1 - id: larger for lower ids, never negative
    many = tl.sum(eq.to(tl.int32), axis=0) > quota
    lo2 = tl.where(many, tl.min(tl.where(eq, low, 2147483647), axis=0), 0)
    hi2 = tl.where(many, tl.max(tl.where(eq, low, 0), axis=0), 0)
    while lo2 < hi2:
        mid = ((lo2.to(tl.int64) + hi2.to(tl.int64) + 1) >> 1).to(tl.int32)
        c = tl.sum((eq & (low >= mid)).to(tl.int32), axis=0)
        up = c >= quota
        lo2 = tl.where(up, mid, lo2)
        hi2 = tl.where(up, hi2, mid - 1)
    return gt | (eq & (low >= lo2))


# Tile rows. A program's tile is ``[A, ROWS, SPAN]``: tile row r holds the ids
# ``r*C + a*SPAN + j`` (C = A*SPAN), in id order along (a, j). With SPAN = 32
# threads x a vector, Triton gives every tile row to one warp (warps along
# axis 1), so reductions over axes 0 and 2 never leave a warp.
@triton.jit
def _rsum(t):
    return tl.sum(tl.sum(t, axis=0), axis=1)


@triton.jit
def _rmax(t):
    return tl.max(tl.max(t, axis=0), axis=1)


@triton.jit
def _rmin(t):
    return tl.min(tl.min(t, axis=0), axis=1)


@triton.jit
def _rcumsum(t):
    """Inclusive prefix sum along each tile row, in id order."""
    seg = tl.sum(t, axis=2)
    return tl.cumsum(t, axis=2) + (tl.cumsum(seg, axis=0) - seg)[:, :, None]


@triton.jit
def _rows_select(k32, valid, K):
    """Per tile row of an ``[A, ROWS, SPAN]`` tensor: the ``K`` largest valid
    entries by value field ``k32``, the first ones (in id order) among ties.

    Every reduction stays inside the row's warp (no block-wide
    synchronisation) and the bisection takes a fixed 32 steps. Returns
    ``(keep, t32 [ROWS], full [ROWS])``: ``t32`` is the value field of the
    row's K-th largest entry when the row has at least K (``full``).
    """
    nvalid = _rsum(valid.to(tl.int32))
    lo = _rmin(tl.where(valid, k32, 2147483647))
    hi = _rmax(tl.where(valid, k32, -2147483647))
    hi = tl.where(nvalid > K, hi, lo)
    for _ in range(32):
        mid = ((lo.to(tl.int64) + hi.to(tl.int64) + 1) >> 1).to(tl.int32)
        c = _rsum((valid & (k32 >= mid[None, :, None])).to(tl.int32))
        up = c >= K
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    gt = valid & (k32 > lo[None, :, None])
    eq = valid & (k32 == lo[None, :, None])
    quota = K - _rsum(gt.to(tl.int32))
    keep = gt | (eq & (_rcumsum(eq.to(tl.int32)) <= quota[None, :, None]))
    return keep, lo, nvalid >= K


@triton.jit
def _compact(ptr, keys, keep):
    """Stores the kept keys, in order, at ``ptr[0 .. #kept)``; returns #kept.

    Callers load ``keys`` from the same place: a barrier separates the loads
    from these stores, and another the stores from later loads.
    """
    dest = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.debug_barrier()
    tl.store(ptr + dest, keys, mask=keep)
    tl.debug_barrier()
    return tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def _write_sorted(ptr, n, out_v, out_i, NC, V, KP: tl.constexpr, CH: tl.constexpr):
    """Writes the ``n <= NC`` keys at ``ptr[0..n)`` to ``out_v/out_i[0..NC)`` in
    descending order (-inf / id 0 after them). A key's place is its rank: the
    number of larger keys, counted ``CH`` columns at a time."""
    kk = tl.arange(0, KP)
    have = kk < n
    key = tl.load(ptr + kk, mask=have, other=0)
    rank = tl.zeros([KP], dtype=tl.int32)
    for c in tl.static_range((KP + CH - 1) // CH):
        cj = c * CH + tl.arange(0, CH)
        kj = tl.load(ptr + cj, mask=cj < n, other=0)
        bigger = (kj[None, :] > key[:, None]) & (cj < n)[None, :]
        rank += tl.sum(bigger.to(tl.int32), axis=1)
    ids = _key_id(key)
    ids = tl.where(ids < V, ids, 0)
    tl.store(out_v + rank, _key_value(key), mask=have)
    tl.store(out_i + rank, ids.to(tl.int64), mask=have)
    pad = (kk >= n) & (kk < NC)
    tl.store(out_v + kk, tl.full([KP], float("-inf"), tl.float32), mask=pad)
    tl.store(out_i + kk, tl.zeros([KP], dtype=tl.int64), mask=pad)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------
@triton.jit
def _logit_stats_kernel(
    x_ptr, stride_b, V, CHUNK, NS,
    out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
    part_f, part_i, part_k, part_n, buf_ptr,
    ROWS: tl.constexpr, A: tl.constexpr, SPAN: tl.constexpr, CAPW: tl.constexpr,
    KP: tl.constexpr, CAND: tl.constexpr, FINAL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Program (row, split): vocabulary ids ``[split*CHUNK, min(V, (split+1)*CHUNK))``.

    Tiles are ``[A, ROWS, SPAN]`` (see ``_rsum``): one warp per tile row, so
    every per-tile reduction stays inside a warp. Each tile row keeps its own
    running statistics and its own candidate buffer
    ``buf_ptr[row, split, r, 0:CAPW]``; they are merged once at the end.
    FINAL (NS == 1): writes the row's outputs. Otherwise writes partials:
    ``part_f[row, split, 0:4] = (m, S0, mu, M2)``, ``part_i[row, split]`` the
    argmax id, ``part_k[row, split, 0:n]`` its top keys and
    ``part_n[row, split] = n``.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_b
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    prog = row.to(tl.int64) * NS + split
    C: tl.constexpr = A * SPAN
    BLOCK: tl.constexpr = ROWS * C
    NEG_INF = float("-inf")

    rr = tl.arange(0, ROWS)[None, :, None]
    tile = rr * C + tl.arange(0, A)[:, None, None] * SPAN + tl.arange(0, SPAN)[None, None, :]
    bcol = tl.arange(0, CAPW // SPAN)[:, None, None] * SPAN + tl.arange(0, SPAN)[None, None, :]
    rbuf = buf_ptr + prog * (ROWS * CAPW) + rr * CAPW  # [1, ROWS, 1]

    # per tile-row running state ([ROWS] vectors)
    m = _rmax(tl.full([A, ROWS, SPAN], NEG_INF, tl.float32))
    S0 = _rsum(tl.zeros([A, ROWS, SPAN], tl.float32))
    mu = S0
    M2 = S0
    am = _rsum(tl.zeros([A, ROWS, SPAN], tl.int32))
    cnt = am  # candidate keys held per tile row
    # a value that NC held keys (all from earlier tiles) beat: entries <= thr
    # can never make the program's top NC
    thr = tl.max(m, axis=0)

    if PREFETCH:  # register double buffering: the next tile's load is in flight
        x_next = tl.load(base + lo + tile, mask=lo + tile < hi, other=NEG_INF)
    for start in range(lo, hi, BLOCK):
        if CAND:
            # room for a full tile row of appends: compact every tile row to
            # its top NC (rarely: the threshold rises each time)
            if tl.max(cnt, axis=0) > CAPW - C:
                held = bcol < cnt[None, :, None]
                # select on the value halves (the high int32 words, little
                # endian), then move the kept keys: fewer live registers
                k32 = tl.load(rbuf.to(tl.pointer_type(tl.int32)) + 2 * bcol + 1,
                              mask=held, other=0)
                keep, t32, full = _rows_select(k32, held, NC)
                dest = _rcumsum(keep.to(tl.int32)) - 1
                bk = tl.load(rbuf + bcol, mask=keep, other=0)
                tl.debug_barrier()
                tl.store(rbuf + dest, bk, mask=keep)
                tl.debug_barrier()
                cnt = _rsum(keep.to(tl.int32))
                thr = tl.maximum(thr, tl.max(tl.where(full, _k32_value(t32), NEG_INF), axis=0))

        offs = start + tile
        inr = offs < hi
        if PREFETCH:
            x = x_next.to(tl.float32)
            nxt = offs + BLOCK
            x_next = tl.load(base + nxt, mask=nxt < hi, other=NEG_INF)
        else:
            x = tl.load(base + offs, mask=inr, other=NEG_INF).to(tl.float32)
        xc = tl.where(x != x, NEG_INF, x)
        tmax = tl.max(tl.max(xc, axis=0), axis=1)

        # argmax: lowest id of the row max when it beats the running max
        amt = tl.where(xc == tmax[None, :, None], offs, 2147483647)
        amt = tl.min(tl.min(amt, axis=0), axis=1)
        am = tl.where(tmax > m, amt, am)

        # moments of the tile row around the new max, merged with Chan's rule
        m_new = tl.maximum(m, tmax)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        is_ninf = x == NEG_INF
        d = tl.where(is_ninf, 0.0, x - m_use[None, :, None])
        e = tl.where(is_ninf, 0.0, tl.exp2(d * LOG2E))
        s0 = tl.sum(tl.sum(e, axis=0), axis=1)
        s1 = tl.sum(tl.sum(d * e, axis=0), axis=1)
        mu_t = tl.where(s0 > 0.0, s1 / s0, 0.0)
        c = d - mu_t[None, :, None]
        m2_t = tl.sum(tl.sum(e * c * c, axis=0), axis=1)
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
            # append (in id order) what can still make the top NC: everything
            # while the tile row holds fewer than NC keys, then entries > thr
            # (tl.where rather than `|` with a scalar: the interpreter would
            # turn the mask into int32)
            app = inr & tl.where(cnt[None, :, None] < NC, inr, xc > thr)
            ai = app.to(tl.int32)
            seg = tl.sum(ai, axis=2)
            pos = tl.cumsum(ai, axis=2) + (tl.cumsum(seg, axis=0) - seg)[:, :, None]
            tl.store(rbuf + cnt[None, :, None] + pos - 1, _pack_key(xc, offs), mask=app)
            cnt += tl.sum(seg, axis=0)

    # merge the tile rows' statistics (Chan's rule, as in the merge kernel)
    Mx = tl.max(m, axis=0)
    Mx_use = tl.where(Mx == NEG_INF, 0.0, Mx)
    fin = m != NEG_INF
    sh = tl.where(fin, m - Mx_use, 0.0)
    al = tl.where(fin, tl.exp2(sh * LOG2E), 0.0)
    w = al * S0
    S0t = tl.sum(w, axis=0)
    pos_ = S0t > 0.0
    S0_safe = tl.where(pos_, S0t, 1.0)
    mup = mu + sh
    mut = tl.sum(w * mup, axis=0) / S0_safe
    dd = mup - mut
    M2t = tl.sum(al * M2 + w * dd * dd, axis=0)
    amx = tl.min(tl.where(m == Mx, am, 2147483647), axis=0)
    amx = tl.where(Mx == NEG_INF, 0, amx)

    if CAND:
        # the program's top NC over all tile rows, compacted to the buffer front
        tl.debug_barrier()
        held = bcol < cnt[None, :, None]
        bk = tl.load(rbuf + bcol, mask=held, other=0)
        keys = tl.reshape(bk, [ROWS * CAPW])
        keep = _select_exact(keys, tl.reshape(held, [ROWS * CAPW]), NC)
        pbuf = buf_ptr + prog * (ROWS * CAPW)
        n_held = _compact(pbuf, keys, keep)

    if FINAL:
        bad = S0t != S0t
        log_s0 = tl.log(S0_safe)
        nan = float("nan")
        lse = tl.where(pos_, Mx + log_s0, NEG_INF)
        ent = tl.where(pos_, (log_s0 - mut) / LN2, 0.0)
        vent = tl.where(pos_, M2t / S0_safe / (LN2 * LN2), 0.0)
        tl.store(out_max + row, tl.where(bad, nan, Mx))
        tl.store(out_arg + row, tl.where(bad, 0, amx).to(tl.int64))
        tl.store(out_lse + row, tl.where(bad, nan, lse))
        tl.store(out_ent + row, tl.where(bad, nan, ent))
        tl.store(out_vent + row, tl.where(bad, nan, vent))
        if CAND:
            _write_sorted(pbuf, n_held, cand_v + row.to(tl.int64) * NC,
                          cand_i + row.to(tl.int64) * NC, NC, V, KP, 32)
    else:
        tl.store(part_f + prog * 4 + 0, Mx)
        tl.store(part_f + prog * 4 + 1, S0t)
        tl.store(part_f + prog * 4 + 2, mut)
        tl.store(part_f + prog * 4 + 3, M2t)
        tl.store(part_i + prog, amx)
        if CAND:
            kk = tl.arange(0, KP)
            tl.store(part_k + prog * KP + kk, tl.load(pbuf + kk, mask=kk < n_held, other=0),
                     mask=kk < n_held)
            tl.store(part_n + prog, n_held)


@triton.jit
def _merge_kernel(
    part_f, part_i, part_k, part_n, NS, V,
    out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
    NSP: tl.constexpr, KP: tl.constexpr, CAND: tl.constexpr,
):
    """One program per row: merges the row's NS split partials (NSP >= NS)."""
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
        # the splits' keys, split after split: id order
        kk = tl.arange(0, KP)
        n_i = tl.load(part_n + p, mask=ok, other=0)
        valid = kk[None, :] < n_i[:, None]
        keys = tl.load(part_k + p[:, None] * KP + kk[None, :], mask=valid, other=0)
        keys = tl.reshape(keys, [NSP * KP])
        valid = tl.reshape(valid, [NSP * KP])
        keep = _select_exact(keys, valid, NC)
        # compact into the row's first partial list (read above), then sort
        rowk = part_k + (row.to(tl.int64) * NS) * KP
        n = _compact(rowk, keys, keep)
        _write_sorted(rowk, n, cand_v + row.to(tl.int64) * NC,
                      cand_i + row.to(tl.int64) * NC, NC, V, KP, 32)


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
         num_warps: Optional[int] = None, prefetch: Optional[bool] = None,
         itemsize: int = 4):
    """Launch plan ``dict(NS, CHUNK, BLOCK, ROWS, A, SPAN, C, CAPW, KP, num_warps,
    prefetch)`` for ``[B, V]`` logits of ``itemsize`` bytes.

    A program reads tiles of ``BLOCK = ROWS * C`` logits, ``C = A * SPAN`` per
    warp (``SPAN`` = 32 threads x one 16-byte vector).

    ``layout``: ``"auto"`` (split when ``B`` is below the SM count), ``"row"``
    or ``"split"``. ``num_splits`` forces the split count (clamped to
    ``1..min(MAX_SPLITS, ceil(V / BLOCK))``); ``block`` forces the tile size (a
    power of two); ``num_warps`` the warps per program; ``prefetch`` loads the
    next tile before working on the current one.
    """
    if layout not in ("auto", "row", "split"):
        raise ValueError(f"layout: expected 'auto', 'row' or 'split', got {layout!r}")
    KP = max(16, _next_pow2(num_candidates)) if num_candidates > 0 else 16
    sms = num_sms(device)
    split = layout == "split" or (layout == "auto" and B < sms)
    if num_warps is None:
        num_warps = 4
    if block is None:
        if device.type != "cuda":
            block = 8192  # interpreter: few large tiles (each op has a fixed cost)
        else:
            block = 32 * 8 * num_warps  # 8 logits per thread
    rows = num_warps
    span = 32 * max(1, 16 // itemsize)
    block = max(rows * span, min(_next_pow2(block), _next_pow2(V)))
    C = block // rows
    capw = _next_pow2(KP + C)
    max_ns = max(1, min(MAX_SPLITS, triton.cdiv(V, block)))
    if not split:
        ns = 1
    elif num_splits is not None:
        ns = max(1, min(int(num_splits), max_ns))
    else:
        ns = max(1, min(max_ns, triton.cdiv(2 * sms, max(B, 1))))
    chunk = triton.cdiv(triton.cdiv(V, ns), block) * block
    ns = triton.cdiv(V, chunk)
    if prefetch is None:
        prefetch = not split and device.type == "cuda"
    return dict(NS=ns, CHUNK=chunk, BLOCK=block, ROWS=rows, A=C // span, SPAN=span, C=C,
                CAPW=capw, KP=KP, num_warps=num_warps, prefetch=bool(prefetch))


def fused_logit_stats(logits: torch.Tensor, num_candidates: int = K_MAX, *,
                      layout: str = "auto", num_splits: Optional[int] = None,
                      block: Optional[int] = None, num_warps: Optional[int] = None,
                      prefetch: Optional[bool] = None
                      ) -> Tuple[LogitStats, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One read of ``logits [B, V]`` (float32, float16 or bfloat16; ``V >= 1``;
    rows may be strided, the last dimension must be contiguous or is made so).

    Returns ``(LogitStats, cand_vals, cand_ids)`` exactly as
    ``entropix_vllm.ops.logit_stats_and_candidates``: float32 ``max``,
    ``logsumexp``, ``entropy`` (bits), ``varentropy`` (bits^2) and int64
    ``argmax`` (lowest id on ties), each ``[B]``; all ``-inf`` row: ``-inf``
    max and logsumexp, zero entropy and varentropy, argmax 0; a row with NaN
    or ``+inf``: NaN statistics, argmax 0. ``cand_vals [B, num_candidates]``
    float32 descending, NaN read as ``-inf``; ``cand_ids`` int64, the lower id
    first among equal values; when the row has fewer than ``num_candidates``
    entries the rest is ``-inf`` with id 0. ``None, None`` when
    ``num_candidates == 0``.

    ``layout``/``num_splits``/``block``/``num_warps``/``prefetch`` override the
    launch plan (see :func:`plan`); results do not depend on them beyond
    float32 rounding of the statistics.
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
    i64 = dict(device=dev, dtype=torch.int64)
    out_max = torch.empty(B, **f32)
    out_lse = torch.empty(B, **f32)
    out_ent = torch.empty(B, **f32)
    out_vent = torch.empty(B, **f32)
    out_arg = torch.empty(B, **i64)
    NC = int(num_candidates)
    cand = NC > 0
    cand_v = torch.empty((B, NC), **f32) if cand else out_max
    cand_i = torch.empty((B, NC), **i64) if cand else out_arg
    stats = LogitStats(out_max, out_arg, out_lse, out_ent, out_vent)
    if B == 0:
        return (stats, cand_v, cand_i) if cand else (stats, None, None)

    p = plan(B, V, NC, dev, layout, num_splits, block, num_warps, prefetch,
             logits.element_size())
    NS, KP = p["NS"], p["KP"]
    buf = torch.empty((B, NS, p["ROWS"] * p["CAPW"]) if cand else (1,), **i64)
    consts = dict(ROWS=p["ROWS"], A=p["A"], SPAN=p["SPAN"], CAPW=p["CAPW"], KP=KP, CAND=cand,
                  PREFETCH=p["prefetch"], num_warps=p["num_warps"])
    if NS == 1:
        _logit_stats_kernel[(B, 1)](
            logits, logits.stride(0), V, p["CHUNK"], 1,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            out_max, out_arg, out_arg, out_arg, buf, FINAL=True, **consts)
    else:
        part_f = torch.empty((B, NS, 4), **f32)
        part_i = torch.empty((B, NS), device=dev, dtype=torch.int32)
        part_k = torch.empty((B, NS, KP) if cand else (1,), **i64)
        part_n = torch.empty((B, NS) if cand else (1,), device=dev, dtype=torch.int32)
        _logit_stats_kernel[(B, NS)](
            logits, logits.stride(0), V, p["CHUNK"], NS,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            part_f, part_i, part_k, part_n, buf, FINAL=False, **consts)
        NSP = _next_pow2(NS)
        _merge_kernel[(B,)](
            part_f, part_i, part_k, part_n, NS, V,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            NSP=NSP, KP=KP, CAND=cand, num_warps=4 if NSP * KP <= 2048 else 8)
    return (stats, cand_v, cand_i) if cand else (stats, None, None)
