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
  ties resolved to the lower id; NaN counts as ``-inf``, as in
  ``reference.topk_candidates``. Two methods (``candidates=``):

  - ``"blockmax"`` (default). The streaming pass also writes the max of every
    block of ``G`` ids (``G`` = one 128-byte line of logits, larger for
    vocabularies above ``MAX_BLOCKS`` lines; the tile is loaded as
    ``[BLOCK // G, G]`` so each block's max is a reduction inside a warp), 1/G
    of the logits' size. A key in the top ``k`` has fewer than ``k`` larger
    keys, so fewer than ``k`` blocks have a larger max: its block is among the
    ``k`` blocks with the largest maxima (equal maxima: the lower block). A
    second small kernel per row (``_blockmax_topk``) selects those ``k``
    blocks from the ``ceil(V / G)`` maxima, reads their ``k * G`` logits
    again and selects and rank-sorts their top ``k`` keys. The streaming loop
    itself does no candidate bookkeeping (its register footprint is that of
    the statistics alone); the extra traffic is the maxima (written, read)
    and ``k`` lines per row.
  - ``"stream"``. Each program appends, in id order, the keys of the entries
    that can still make its top ``k`` to a small scratch buffer (``CAP``
    keys, L2 resident): every entry while fewer than ``k`` are held,
    afterwards only entries ``> thr``, where ``thr`` is a value that at least
    ``k`` held entries reach (equal values cannot qualify later: their ids
    are higher). A tile whose max is ``<= thr`` costs nothing more; positions
    come from a prefix sum of the append mask. When a tile would add more
    than ``CAP - k`` keys (the first tile), its own top ``k`` is selected
    first; when the buffer would overflow it is compacted to its top ``k``.
    At the end the held keys are selected once more and sorted by rank.

  Selection (``_select``) bisects the 32-bit value field for the k-th
  largest value (a counting reduction per step, stopping early when exactly
  ``k`` entries are at or above the probe; no sorting) and keeps the
  lowest-id entries among ties by a prefix sum. The final order is by rank
  (each key's rank is the number of larger keys, counted in chunks), written
  straight into the output.

Two launch layouts:

* ``"row"``: one program per row (large batches), then, with ``"blockmax"``,
  one candidate program per row.
* ``"split"``: ``NS`` programs per row each over a contiguous vocabulary chunk
  (a whole number of tiles, so no block straddles two), writing ``(m, S0,
  mu, M2, argmax)`` (and, with ``"stream"``, their top-``k`` keys) to small
  partial buffers, then one merge program per row (Chan merge of the
  partials; the candidates from the block maxima, or selection and rank
  sort of the ``NS * k`` keys). Used when the batch is smaller than the
  number of SMs so that batch 1 spreads over the whole GPU.

No host synchronisation; all buffers have sizes fixed by the shape, so the
launch can be captured in a CUDA graph. No recompilation per step
(``launch.py``): the batch size reaches the kernels' specialisation keys only
through the layout (split below the SM count, row from it on: two variants of
the streaming kernel); the split count and the chunk (in tiles) are passed
unspecialised, the merge kernel's partial vector has one size (but for
``"stream"``, where it follows the split count), and the outputs are views
starting on 16-byte boundaries whatever the batch size.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from entropix_vllm.contract import K_MAX, LogitStats

from . import launch

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MAX_SPLITS = 64  # upper bound on vocabulary splits per row (merge kernel size)

# candidate modes (the kernels' CMODE): none, "stream", "blockmax"
NO_CANDIDATES = tl.constexpr(0)
STREAM = tl.constexpr(1)
BLOCKMAX = tl.constexpr(2)


# ----------------------------------------------------------------------------
# Keys and selection
# ----------------------------------------------------------------------------
@triton.jit
def _pack_key(v, ids):
    """int64 key of (float32 value, int32 id): larger value first, then lower id.

    The float's bits map to an int32 ordered like the float (a negative float
    has its 31 low bits flipped; ``-0.0`` is taken as ``+0.0``); the low 32
    bits hold ``2**31 - 1 - id``.
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
    """int32 ordered like the float32 ``v`` (the high half of its key); ``-0.0``
    maps to the same field as ``+0.0`` (equal values: the lower id first)."""
    b = tl.where(v == 0.0, 0, v.to(tl.int32, bitcast=True))
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _select(k32, valid, K):
    """The ``K`` largest valid keys of a 1-D tensor whose order is id order,
    given their value fields ``k32`` (int32, see ``_k32``).

    Returns ``(keep, t32)``: ``keep`` marks ``min(K, #valid)`` entries; when
    at least K entries are valid, every kept entry's value field is ``>= t32``
    and no other entry's is larger (``t32`` is the K-th largest value field,
    or lies between it and the next larger one). The threshold is found by bisection over the
    int32 value field (each step one counting reduction); among the entries
    equal to it the first ones (lowest ids) fill the remaining places.
    """
    nvalid = tl.sum(valid.to(tl.int32), axis=0)
    lo = tl.min(tl.where(valid, k32, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, k32, -2147483647), axis=0)
    hi = tl.where(nvalid > K, hi, lo)
    # invariant: at least K valid entries have a value field >= lo; a step
    # that finds exactly K at or above ``mid`` ends the search there (distinct
    # values: about log2(#valid) steps rather than 31)
    while lo < hi:
        mid = ((lo.to(tl.int64) + hi.to(tl.int64) + 1) >> 1).to(tl.int32)
        c = tl.sum((valid & (k32 >= mid)).to(tl.int32), axis=0)
        up = c >= K
        lo = tl.where(up, mid, lo)
        hi = tl.where(c == K, mid, tl.where(up, hi, mid - 1))
    gt = valid & (k32 > lo)
    eq = valid & (k32 == lo)
    quota = K - tl.sum(gt.to(tl.int32), axis=0)
    keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= quota))
    return keep, lo


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


@triton.jit
def _blockmax_topk(x_row, V, bm_row, NB, scratch, out_v, out_i, NC,
                   G: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr):
    """The row's top ``NC`` keys from its block maxima, sorted into ``out_v/out_i``.

    ``bm_row[0..NB)`` holds the max of each block of ``G`` ids (``NBP >= NB``).
    A key in the row's top ``NC`` has fewer than ``NC`` larger keys, so fewer
    than ``NC`` blocks have a larger max key: its block is among the ``NC``
    blocks with the largest max keys (block maxima compared by value, then
    the lower block index, which orders them exactly as their max keys).
    Those blocks (``NC * G`` ids, in id order) are read back from the logits
    and their top ``NC`` keys selected and rank-sorted. ``scratch`` holds
    ``KP`` int64 (block indices, then keys).
    """
    NEG_INF = float("-inf")
    j = tl.arange(0, NBP)
    okb = j < NB
    bm = tl.load(bm_row + j, mask=okb, other=NEG_INF)
    keepb, _ = _select(_k32(bm), okb, NC)
    nb = _compact(scratch, j.to(tl.int64), keepb)
    t = tl.arange(0, KP * G)
    slot = t // G
    have = slot < nb
    blk = tl.load(scratch + slot, mask=have, other=0).to(tl.int32)
    ids = blk * G + t % G
    valid = have & (ids < V)
    v = tl.load(x_row + ids, mask=valid, other=NEG_INF).to(tl.float32)
    v = tl.where(v != v, NEG_INF, v)
    keep, _ = _select(_k32(v), valid, NC)
    n = _compact(scratch, _pack_key(v, ids), keep)
    _write_sorted(scratch, n, out_v, out_i, NC, V, KP, 32)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------
@triton.jit(do_not_specialize=["CHUNK_TILES", "NS"])
def _logit_stats_kernel(
    x_ptr, stride_b, V, CHUNK_TILES, NS,
    out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
    part_f, part_i, part_k, part_n, buf_ptr, bmax_ptr, NB,
    BLOCK: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr,
    CMODE: tl.constexpr, G: tl.constexpr, FINAL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Program (row, split): vocabulary ids ``[split*CHUNK, min(V, (split+1)*CHUNK))``,
    ``CHUNK = CHUNK_TILES * BLOCK`` (passed in tiles and unspecialised, like
    ``NS``: both change with the batch size, and the tile count keeps the
    compiler's knowledge that a chunk starts on a tile boundary).

    FINAL (NS == 1): writes the row's statistics (and, with ``CMODE ==
    STREAM``, its candidates). Otherwise writes partials: ``part_f[row, split,
    0:4] = (m, S0, mu, M2)``, ``part_i[row, split]`` the argmax id and, with
    ``CMODE == STREAM``, ``part_k[row, split, 0:n]`` its top keys (id order)
    and ``part_n[row, split] = n``; ``buf_ptr[row, split, 0:CAP]`` is scratch.
    With ``CMODE == BLOCKMAX`` it writes ``bmax_ptr[row, j]``, the max of ids
    ``[j*G, (j+1)*G)`` (NaN read as ``-inf``), for the ``NB`` blocks of the
    row that its ids cover.
    """
    CAND: tl.constexpr = CMODE == STREAM
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_b
    CHUNK = CHUNK_TILES * BLOCK
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    prog = row.to(tl.int64) * NS + split
    buf = buf_ptr + prog * CAP

    if CMODE == BLOCKMAX:  # tiles as [BLOCK // G, G]: one row per block of G ids
        ar = tl.arange(0, BLOCK // G)[:, None] * G + tl.arange(0, G)[None, :]
        bm_row = bmax_ptr + row.to(tl.int64) * NB
    else:
        ar = tl.arange(0, BLOCK)
    NEG_INF = float("-inf")

    m = tl.max(tl.full([BLOCK], NEG_INF, tl.float32), axis=0)
    S0 = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    mu = S0
    M2 = S0
    am = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    thr = m  # candidates: a value at least NC held keys reach (-inf: none yet)
    cnt = am  # keys held in the scratch buffer

    if PREFETCH:  # register double buffering: the next tile's load is in flight
        x_next = tl.load(base + lo + ar, mask=lo + ar < hi, other=NEG_INF)
    for start in range(lo, hi, BLOCK):
        offs = start + ar
        inr = offs < hi
        if PREFETCH:
            x = x_next.to(tl.float32)
            nxt = offs + BLOCK
            x_next = tl.load(base + nxt, mask=nxt < hi, other=NEG_INF)
        else:
            x = tl.load(base + offs, mask=inr, other=NEG_INF).to(tl.float32)
        xc = tl.where(x != x, NEG_INF, x)
        if CMODE == BLOCKMAX:
            bm = tl.max(xc, axis=1)
            bidx = start // G + tl.arange(0, BLOCK // G)
            tl.store(bm_row + bidx, bm, mask=bidx * G < hi)
            tmax = tl.max(bm, axis=0)
        else:
            tmax = tl.max(xc, axis=None)

        # argmax: lowest id of the tile max when it beats the running max
        if tmax > m:
            am = tl.min(tl.where(xc == tmax, offs, 2147483647), axis=None)

        # moments of the tile around the new max, merged with Chan's rule
        m_new = tl.maximum(m, tmax)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        is_ninf = x == NEG_INF
        d = tl.where(is_ninf, 0.0, x - m_use)
        e = tl.where(is_ninf, 0.0, tl.exp2(d * LOG2E))
        s0 = tl.sum(e, axis=None)
        s1 = tl.sum(d * e, axis=None)
        mu_t = tl.where(s0 > 0.0, s1 / s0, 0.0)
        c = d - mu_t
        m2_t = tl.sum(e * c * c, axis=None)
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
            if (tmax > thr) | (cnt < NC):
                # (tl.where rather than `|` with a scalar: the interpreter
                # would turn the mask into int32)
                app = inr & tl.where(cnt < NC, inr, xc > thr)
                n = tl.sum(app.to(tl.int32), axis=0)
                if n > CAP - NC:
                    # too many for the buffer: keep the tile's own top NC
                    keep, t32 = _select(_k32(xc), app, NC)
                    app = keep
                    n = tl.sum(app.to(tl.int32), axis=0)
                    thr = tl.where(n >= NC, tl.maximum(thr, _k32_value(t32)), thr)
                if cnt + n > CAP:
                    # compact the buffer (it holds > CAP - n >= NC keys) to its top NC
                    ci = tl.arange(0, CAP)
                    held = ci < cnt
                    bk = tl.load(buf + ci, mask=held, other=0)
                    keep, t32 = _select((bk >> 32).to(tl.int32), held, NC)
                    cnt = _compact(buf, bk, keep)
                    thr = tl.maximum(thr, _k32_value(t32))
                    app = app & (xc > thr)
                    n = tl.sum(app.to(tl.int32), axis=0)
                pos = cnt + tl.cumsum(app.to(tl.int32), axis=0) - 1
                tl.store(buf + pos, _pack_key(xc, offs), mask=app)
                cnt += n

    if CAND:
        # the held keys' top NC, compacted to the front of the buffer
        tl.debug_barrier()
        ci = tl.arange(0, CAP)
        held = ci < cnt
        bk = tl.load(buf + ci, mask=held, other=0)
        keep, t32 = _select((bk >> 32).to(tl.int32), held, NC)
        cnt = _compact(buf, bk, keep)

    if FINAL:
        bad = S0 != S0
        pos_ = S0 > 0.0
        log_s0 = tl.log(tl.where(pos_, S0, 1.0))
        nan = float("nan")
        lse = tl.where(pos_, m + log_s0, NEG_INF)
        ent = tl.where(pos_, (log_s0 - mu) / LN2, 0.0)
        vent = tl.where(pos_, M2 / tl.where(pos_, S0, 1.0) / (LN2 * LN2), 0.0)
        tl.store(out_max + row, tl.where(bad, nan, m))
        tl.store(out_arg + row, tl.where(bad, 0, am).to(tl.int64))
        tl.store(out_lse + row, tl.where(bad, nan, lse))
        tl.store(out_ent + row, tl.where(bad, nan, ent))
        tl.store(out_vent + row, tl.where(bad, nan, vent))
        if CAND:
            _write_sorted(buf, cnt, cand_v + row.to(tl.int64) * NC,
                          cand_i + row.to(tl.int64) * NC, NC, V, KP, 32)
    else:
        tl.store(part_f + prog * 4 + 0, m)
        tl.store(part_f + prog * 4 + 1, S0)
        tl.store(part_f + prog * 4 + 2, mu)
        tl.store(part_f + prog * 4 + 3, M2)
        tl.store(part_i + prog, am)
        if CAND:
            kk = tl.arange(0, KP)
            tl.store(part_k + prog * KP + kk, tl.load(buf + kk, mask=kk < cnt, other=0),
                     mask=kk < cnt)
            tl.store(part_n + prog, cnt)


@triton.jit
def _candidates_kernel(x_ptr, stride_b, V, bmax_ptr, NB, scratch_ptr, cand_v, cand_i, NC,
                       G: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr):
    """One program per row: candidates from the block maxima (one program per row layout)."""
    row = tl.program_id(0)
    r64 = row.to(tl.int64)
    _blockmax_topk(x_ptr + r64 * stride_b, V, bmax_ptr + r64 * NB, NB, scratch_ptr + r64 * KP,
                   cand_v + r64 * NC, cand_i + r64 * NC, NC, G, NBP, KP)


@triton.jit(do_not_specialize=["NS"])
def _merge_kernel(
    part_f, part_i, part_k, part_n, NS, V,
    out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
    x_ptr, stride_b, bmax_ptr, NB,
    NSP: tl.constexpr, KP: tl.constexpr, CMODE: tl.constexpr, G: tl.constexpr,
    NBP: tl.constexpr,
):
    """One program per row: merges the row's NS split partials (NSP >= NS);
    with ``CMODE == BLOCKMAX`` selects the candidates from the block maxima
    (``part_k[row, 0, :]`` is the scratch)."""
    CAND: tl.constexpr = CMODE == STREAM
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
        keep, t32 = _select((keys >> 32).to(tl.int32), valid, NC)
        # compact into the row's first partial list (read above), then sort
        rowk = part_k + (row.to(tl.int64) * NS) * KP
        n = _compact(rowk, keys, keep)
        _write_sorted(rowk, n, cand_v + row.to(tl.int64) * NC,
                      cand_i + row.to(tl.int64) * NC, NC, V, KP, 32)
    if CMODE == BLOCKMAX:
        r64 = row.to(tl.int64)
        _blockmax_topk(x_ptr + r64 * stride_b, V, bmax_ptr + r64 * NB, NB,
                       part_k + (r64 * NS) * KP, cand_v + r64 * NC, cand_i + r64 * NC, NC,
                       G, NBP, KP)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 8 for CPU tensors
    under the Triton interpreter, so that both layouts get exercised there);
    ``launch.device_profile``."""
    return launch.device_profile(device).sms


_next_pow2 = launch.next_pow2


CANDIDATE_METHODS = ("blockmax", "stream")
MAX_BLOCKS = 8192  # block maxima per row (the selection over them is one tensor)


@functools.lru_cache(maxsize=256)
def _plan(B: int, V: int, num_candidates: int, itemsize: int, sms: int, cuda: bool,
          layout: str, num_splits: Optional[int], block: Optional[int],
          num_warps: Optional[int], prefetch: Optional[bool], candidates: str) -> dict:
    KP = max(16, _next_pow2(num_candidates)) if num_candidates > 0 else 16
    cap = min(1024, max(256, 8 * KP))
    split = layout == "split" or (layout == "auto" and B < sms)
    if block is None:
        if not cuda:
            block = 16384  # interpreter: few large tiles (each op has a fixed cost)
        else:
            block = 2048 if split else 4096
    block = max(16, min(_next_pow2(block), _next_pow2(V)))
    cmode = (NO_CANDIDATES.value if num_candidates == 0 else
             BLOCKMAX.value if candidates == "blockmax" else STREAM.value)
    # block maxima: blocks of G ids, 128 bytes of logits (one cache line) or
    # more so that a row has at most MAX_BLOCKS of them; a tile holds whole blocks
    g = max(128 // itemsize, _next_pow2(triton.cdiv(V, MAX_BLOCKS)))
    if cmode == BLOCKMAX.value:
        block = max(block, min(g, _next_pow2(V)))
    g = min(g, block)
    nb = triton.cdiv(V, g)
    max_ns = max(1, min(MAX_SPLITS, triton.cdiv(V, block)))
    if not split:
        ns = 1
    elif num_splits is not None:
        ns = max(1, min(int(num_splits), max_ns))
    else:
        ns = max(1, min(max_ns, triton.cdiv(2 * sms, max(B, 1))))
    chunk = triton.cdiv(triton.cdiv(V, ns), block) * block
    ns = triton.cdiv(V, chunk)
    # the merge kernel's partial vector: for the statistics (and the block
    # maxima) one fixed size, whatever NS the batch size gives, so that the
    # merge compiles once; "stream" merges NSP * KP keys, so there it follows
    # NS (a power of two <= MAX_SPLITS: at most log2(MAX_SPLITS) + 1 sizes)
    nsp = _next_pow2(ns) if cmode == STREAM.value else _next_pow2(MAX_SPLITS)
    # defaults from the H100 sweep in benchmarks/RESULTS.md. "stream": 4
    # warps, and for one program per row a register double-buffered next tile.
    # Statistics alone and "blockmax" (whose streaming kernel has the register
    # footprint of the statistics alone in sm_90 builds): 8 warps for one
    # program per row without prefetch, the configuration of the statistics'
    # measured row.
    if num_warps is None:
        num_warps = 8 if block >= 8192 or (cmode != STREAM.value and not split) else 4
    if prefetch is None:
        prefetch = not split and cuda and cmode == STREAM.value
    gather = KP * g
    cand_warps = (4 if max(_next_pow2(nb), gather) <= 4096 else
                  (8 if max(_next_pow2(nb), gather) <= 8192 else 16))
    if cmode == STREAM.value:
        merge_warps = 4 if nsp * KP <= 2048 else 8
    else:  # the statistics of NSP partials (tiny), then the block-maxima selection
        merge_warps = cand_warps if cmode == BLOCKMAX.value else 4
    return dict(NS=ns, CHUNK=chunk, BLOCK=block, CAP=cap, KP=KP, num_warps=num_warps,
                prefetch=bool(prefetch), CMODE=cmode, G=g, NB=nb, NBP=_next_pow2(nb),
                cand_warps=cand_warps, NSP=nsp, merge_warps=merge_warps)


def plan(B: int, V: int, num_candidates: int, device: torch.device, layout: str = "auto",
         num_splits: Optional[int] = None, block: Optional[int] = None,
         num_warps: Optional[int] = None, prefetch: Optional[bool] = None,
         candidates: str = "blockmax", itemsize: int = 4):
    """Launch plan for ``[B, V]`` logits of ``itemsize`` bytes: a dict with
    ``NS, CHUNK, BLOCK, CAP, KP, num_warps, prefetch`` (the streaming kernel),
    ``CMODE`` (0: no candidates, 1: ``"stream"``, 2: ``"blockmax"``), ``G``,
    ``NB``, ``NBP`` and ``cand_warps`` (block maxima and the candidate kernel),
    ``NSP`` and ``merge_warps`` (the merge kernel of the split layout).

    The batch size enters the kernels' specialisation keys only through the
    layout (split below the SM count, row from it on): ``NS`` and ``CHUNK``
    are passed unspecialised, ``NSP`` is fixed but for ``"stream"``.

    ``layout``: ``"auto"`` (split when ``B`` is below the SM count), ``"row"``
    or ``"split"``. ``num_splits`` forces the split count (clamped to
    ``1..min(MAX_SPLITS, ceil(V / BLOCK))``); ``block`` forces the tile size (a
    power of two); ``num_warps`` the warps per program; ``prefetch`` loads the
    next tile before working on the current one. ``candidates``: ``"blockmax"``
    (the streaming pass writes per-block maxima; a second small kernel selects
    from them) or ``"stream"`` (each program keeps its candidates while
    streaming; see the module docstring). Plans are cached.
    """
    if layout not in ("auto", "row", "split"):
        raise ValueError(f"layout: expected 'auto', 'row' or 'split', got {layout!r}")
    if candidates not in CANDIDATE_METHODS:
        raise ValueError(f"candidates: expected one of {CANDIDATE_METHODS}, got {candidates!r}")
    prof = launch.device_profile(device)
    return dict(_plan(int(B), int(V), int(num_candidates), int(itemsize), prof.sms, prof.gpu,
                      layout, num_splits, block, num_warps, prefetch, candidates))


def fused_logit_stats(logits: torch.Tensor, num_candidates: int = K_MAX, *,
                      layout: str = "auto", num_splits: Optional[int] = None,
                      block: Optional[int] = None, num_warps: Optional[int] = None,
                      prefetch: Optional[bool] = None, candidates: str = "blockmax"
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

    ``layout``/``num_splits``/``block``/``num_warps``/``prefetch``/``candidates``
    override the launch plan (see :func:`plan`); results do not depend on them
    beyond float32 rounding of the statistics.
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
    NC = int(num_candidates)
    p = plan(B, V, NC, dev, layout, num_splits, block, num_warps, prefetch, candidates,
             logits.element_size())
    # outputs: views of one float32 and one int64 allocation, each starting on
    # a 16-byte boundary whatever B is (Triton specialises on that alignment)
    Bp = launch.aligned(B, 4)  # a multiple of 4: 16 bytes of float32 and of int64 pairs
    fbuf = torch.empty(Bp * 4 + B * NC, device=dev, dtype=torch.float32)
    ibuf = torch.empty(Bp + B * NC, device=dev, dtype=torch.int64)
    out_max, out_lse, out_ent, out_vent = fbuf[:4 * Bp].view(4, Bp)[:, :B].unbind(0)
    out_arg = ibuf[:B]
    cand = NC > 0
    cand_v = fbuf[4 * Bp:].view(B, NC) if cand else out_max
    cand_i = ibuf[Bp:].view(B, NC) if cand else out_arg
    stats = LogitStats(out_max, out_arg, out_lse, out_ent, out_vent)
    if B == 0:
        return (stats, cand_v, cand_i) if cand else (stats, None, None)

    NS, KP, CAP, CMODE, G, NB = p["NS"], p["KP"], p["CAP"], p["CMODE"], p["G"], p["NB"]
    i64 = dict(device=dev, dtype=torch.int64)
    buf = torch.empty((B, NS, CAP) if CMODE == STREAM.value else (1,), **i64)
    bmax = torch.empty((B, NB) if CMODE == BLOCKMAX.value else (1,), device=dev, dtype=torch.float32)
    consts = dict(BLOCK=p["BLOCK"], CAP=CAP, KP=KP, CMODE=CMODE, G=G, PREFETCH=p["prefetch"],
                  num_warps=p["num_warps"])
    if NS == 1:
        _logit_stats_kernel[(B, 1)](
            logits, logits.stride(0), V, p["CHUNK"] // p["BLOCK"], 1,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            out_max, out_arg, out_arg, out_arg, buf, bmax, NB, FINAL=True, **consts)
        if CMODE == BLOCKMAX.value:
            scratch = torch.empty((B, KP), **i64)
            _candidates_kernel[(B,)](
                logits, logits.stride(0), V, bmax, NB, scratch, cand_v, cand_i, NC,
                G=G, NBP=p["NBP"], KP=KP, num_warps=p["cand_warps"])
    else:
        part_f = torch.empty((B, NS, 4), device=dev, dtype=torch.float32)
        part_i = torch.empty((B, NS), device=dev, dtype=torch.int32)
        part_k = torch.empty((B, NS, KP) if cand else (1,), **i64)
        part_n = torch.empty((B, NS) if CMODE == STREAM.value else (1,), device=dev, dtype=torch.int32)
        _logit_stats_kernel[(B, NS)](
            logits, logits.stride(0), V, p["CHUNK"] // p["BLOCK"], NS,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            part_f, part_i, part_k, part_n, buf, bmax, NB, FINAL=False, **consts)
        _merge_kernel[(B,)](
            part_f, part_i, part_k, part_n, NS, V,
            out_max, out_arg, out_lse, out_ent, out_vent, cand_v, cand_i, NC,
            logits, logits.stride(0), bmax, NB,
            NSP=p["NSP"], KP=KP, CMODE=CMODE, G=G, NBP=p["NBP"], num_warps=p["merge_warps"])
    return (stats, cand_v, cand_i) if cand else (stats, None, None)
