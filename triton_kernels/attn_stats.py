"""Attention statistics (SPEC section 2) over vLLM's paged K cache, in Triton.

For each request ``b`` with ``L_b`` keys and each query head ``h`` (reading kv
head ``h // (H // H_kv)``)::

    s_hk = scale * <q_h, k_k>,   P_hk = softmax_k(s_hk)
    e_h  = -sum_k P_hk log2 P_hk
    attn_entropy    = mean_h e_h
    attn_varentropy = mean_h (e_h - attn_entropy)^2
    agreement       = mean_{h,k} |P_hk - mean_h' P_h'k|
    interaction_strength = mean_{h,k} |s_hk|

Two passes over the keys; nothing of size ``B x H x L`` is ever written.

Pass 1 (:func:`head_stats`, kernel ``_head_partials_kernel``), grid
``(splits, H_kv, B)``: each program takes one request, one kv head (all the
query heads that read it) and one contiguous split of the request's keys. It
walks the split in tiles of ``BLOCK_N1`` keys gathered through the block table
(any block size, any strides) and keeps, per query head, an online softmax:
the running max ``m`` and the max-shifted moments ``S0 = sum e^(s-m)``,
``S1 = sum (s-m) e^(s-m)`` (rescaled when ``m`` grows, every ``-inf`` case
guarded), plus ``sum |s|``. It writes these four partials, then bumps a
per-request arrival counter; the program that arrives last merges the
request's partials (in a fixed order, so the result does not depend on which
program is last) into per-head ``lse`` (natural log), ``e_h`` (bits) and
``sum_k |s_hk|``, and writes attn_entropy, attn_varentropy and
interaction_strength of the request.

Pass 2 (:func:`agreement_abs_sum`, kernel ``_agreement_kernel``), grid
``(splits, B)``: each program takes one request and one split of its keys and
recomputes, per tile, the scores of *all* heads at once: the K tile of every
kv head is loaded as one ``[H_kv * BLOCK_N2, D]`` block and multiplied by the
request's whole ``[H, D]`` query block (one ``tl.dot``; the entries pairing a
query head with a kv head it does not read are masked away). With the global
``lse`` from pass 1 it forms ``P_hk``, the mean attention row ``Pbar_k`` and
sums ``|P_hk - Pbar_k|``. Per-program sums go to a small ``[B * splits]``
buffer; the last program of each request (arrival counter again) adds them up
in a fixed order and writes ``agreement``. Pass 2 runs its programs in the
reverse order of pass 1 so that the keys pass 1 read last (possibly still in
L2) are read first (cheap; no measurable effect at the benchmarked sizes).

Both passes are bandwidth-bound; each costs about one read of the keys at
large sizes (measured on an H100: benchmarks/RESULTS.md), so the whole costs
about two reads. A single persistent launch that hands out pass-1 and pass-2
tiles in an L2-friendly order (re-reading a request's keys while still in L2)
was built and measured: it was slower everywhere but at batch 1 (per-tile
overheads, low occupancy), and was dropped.

No host synchronisation: no ``.item()``, no Python loop over requests. The
grid is sized from the upper bound ``block_table.shape[1] * block_size`` (or
from ``max_seq_len`` when a caller passes it; it must be at least
``max(seq_lens)``: keys past it, and past the block table's capacity, are
ignored); programs past a request's length exit at once, and the program of
split 0 of a request with no keys writes its zero figures.

CUDA graphs: every scratch buffer (both passes' partials, the per-head
results, the two arrival counters) lives in a workspace made once for a
maximum batch (:func:`make_workspace`, ``ops.attention_workspace``) and the
figures go to a caller's ``[4, >= B]`` buffer (``out=``). The counters are
zeroed when the workspace is made and the last program of each request sets
its counter back to zero, so no memset precedes a launch. A call with both
then allocates nothing and its launches depend only on B and the shapes: it
can be captured and replayed. Per-step ints (split counts, keys per split,
``max_seq_len``, the figures' strides) are passed unspecialised
(``PASS1_PER_STEP``, ``PASS2_PER_STEP``; ``launch.py``): the kernels compile
once per layer shape, whatever B and the lengths.

Tensor parallelism: the integration (``entropix_vllm/integration/attention.py``)
all-gathers the chosen layer's query rows and new keys over the TP group, so
every rank calls :func:`paged_attention_stats` with all heads and gets the same
figures; nothing here is per rank. :func:`head_stats` and
:func:`agreement_abs_sum` run pass 1 or pass 2 alone (for the benchmarks).

Works on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported). fp32, fp16 and
bf16 queries and caches; quantized (fp8) caches are refused with a TypeError.
When the query and the cache share a 16-bit dtype the scores use the tensor
cores (exact products, fp32 accumulation); otherwise both are taken to fp32
and multiplied in IEEE fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from entropix_vllm.contract import AttnStats, AttnWorkspace

from . import launch

__all__ = [
    "paged_attention_stats",
    "make_workspace",
    "head_stats",
    "agreement_abs_sum",
    "HeadStats",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------
@triton.jit
def _online_update(m, s0, s1, a, s, valid):
    """Fold a tile of scores ``s [R, N]`` (entries where ``valid``) into the
    running per-row max ``m`` and shifted moments ``s0, s1`` and ``sum |s|``."""
    neg_inf = float("-inf")
    m_new = tl.maximum(m, tl.max(tl.where(valid, s, neg_inf), axis=1))
    m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
    d = tl.where(valid, s - m_ref[:, None], 0.0)
    e = tl.where(valid, tl.exp(d), 0.0)
    had = m > neg_inf
    alpha = tl.where(had, tl.exp(m - m_ref), 0.0)
    shift = tl.where(had, m - m_ref, 0.0)
    s1 = alpha * (s1 + shift * s0) + tl.sum(d * e, axis=1)
    s0 = alpha * s0 + tl.sum(e, axis=1)
    a = a + tl.sum(tl.where(valid, tl.abs(s), 0.0), axis=1)
    return m_new, s0, s1, a


@triton.jit
def _merge_partials(M, S0, S1, A, mp, s0p, s1p, ap, ok):
    """Fold partials ``[C, H]`` (rows where ``ok``) into per-head
    ``M, S0, S1, A`` (``[H]``); ``mp`` holds ``-inf`` where not ``ok``."""
    neg_inf = float("-inf")
    M_new = tl.maximum(M, tl.max(mp, axis=0))
    M_ref = tl.where(M_new == neg_inf, 0.0, M_new)
    live = ok & (mp > neg_inf)
    dm = tl.where(live, mp - M_ref[None, :], 0.0)
    w = tl.where(live, tl.exp(dm), 0.0)
    had = M > neg_inf
    alpha = tl.where(had, tl.exp(M - M_ref), 0.0)
    shift = tl.where(had, M - M_ref, 0.0)
    S1 = alpha * (S1 + shift * S0) + tl.sum(w * (s1p + dm * s0p), axis=0)
    S0 = alpha * S0 + tl.sum(w * s0p, axis=0)
    A = A + tl.sum(tl.where(ok, ap, 0.0), axis=0)
    return M_new, S0, S1, A


@triton.jit
def _load_q(q_ptr, k_ptr, b, rows, row_ok, d, d_ok, sq_b, sq_h, sq_d, HALF_DOT: tl.constexpr):
    qv = tl.load(q_ptr + b.to(tl.int64) * sq_b + rows[:, None] * sq_h + d[None, :] * sq_d,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HALF_DOT:
        qv = qv.to(k_ptr.dtype.element_ty)
    else:
        qv = qv.to(tl.float32)
    return qv


@triton.jit
def _all_head_scores(qv, k_ptr, bt_row, n0, end, r_g, r_j, d, d_ok, gsel, scale,
                     sk_n, sk_p, sk_h, sk_d, sbt_n,
                     HKV: tl.constexpr, HKV_PAD: tl.constexpr, BS: tl.constexpr,
                     BLOCK_N: tl.constexpr, H_PAD: tl.constexpr, HALF_DOT: tl.constexpr):
    """Scores ``[H_PAD, BLOCK_N]`` of every query head of a request against keys
    ``n0 .. n0+BLOCK_N-1`` (those ``< end``; others 0). The K rows of all kv
    heads are loaded as one block (row ``g * BLOCK_N + j``), multiplied by the
    whole query block, and each head keeps the products with its kv head."""
    nr = n0 + r_j
    r_ok = (nr < end) & (r_g < HKV)
    blk = tl.load(bt_row + (nr // BS) * sbt_n, mask=r_ok, other=0).to(tl.int64)
    koff = blk * sk_n + (nr % BS).to(tl.int64) * sk_p + r_g.to(tl.int64) * sk_h
    kv = tl.load(k_ptr + koff[:, None] + d[None, :] * sk_d,
                 mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if HALF_DOT:
        sf = tl.dot(qv, tl.trans(kv))
    else:
        sf = tl.dot(qv, tl.trans(kv.to(tl.float32)), input_precision="ieee")
    s3 = tl.reshape(sf, (H_PAD, HKV_PAD, BLOCK_N))
    return tl.sum(tl.where(gsel, s3, 0.0), axis=1) * scale


@triton.jit
def _finish_heads(part_ptr, plane, row0, n_split, head_ptr, head_plane, out_ptr, s_out, s_outb,
                  b, H, L, H_PAD: tl.constexpr, S_CHUNK: tl.constexpr):
    """Merge one request's ``n_split`` partials (rows ``row0 ..`` of the
    ``[4, plane]`` partials, head-minor), in order; write per-head lse /
    entropy / sum|s| (``[3, head_plane]``, request-major) and the request's
    attn_entropy, attn_varentropy, interaction_strength (figures 0, 1, 3)."""
    hh = tl.arange(0, H_PAD)
    h_ok = hh < H
    M = tl.full([H_PAD], float("-inf"), tl.float32)
    S0 = tl.zeros([H_PAD], tl.float32)
    S1 = tl.zeros([H_PAD], tl.float32)
    A = tl.zeros([H_PAD], tl.float32)
    for c0 in range(0, n_split, S_CHUNK):
        ss = c0 + tl.arange(0, S_CHUNK)
        ok = (ss < n_split)[:, None] & h_ok[None, :]
        off = (row0 + ss)[:, None] * H + hh[None, :]
        mp = tl.load(part_ptr + off, mask=ok, other=float("-inf"), volatile=True)
        s0p = tl.load(part_ptr + plane + off, mask=ok, other=0.0, volatile=True)
        s1p = tl.load(part_ptr + 2 * plane + off, mask=ok, other=0.0, volatile=True)
        ap = tl.load(part_ptr + 3 * plane + off, mask=ok, other=0.0, volatile=True)
        M, S0, S1, A = _merge_partials(M, S0, S1, A, mp, s0p, s1p, ap, ok)
    S0_safe = tl.where(h_ok, S0, 1.0)
    log_s0 = tl.log(S0_safe)
    lse = tl.where(h_ok, M, 0.0) + log_s0
    ent = tl.where(h_ok, (log_s0 - S1 / S0_safe) * 1.4426950408889634, 0.0)
    hb = head_ptr + b * H + hh
    tl.store(hb, lse, mask=h_ok)
    tl.store(hb + head_plane, ent, mask=h_ok)
    tl.store(hb + 2 * head_plane, A, mask=h_ok)
    Hf = H * 1.0
    ae = tl.sum(ent, axis=0) / Hf
    dev = tl.where(h_ok, ent - ae, 0.0)
    av = tl.sum(dev * dev, axis=0) / Hf
    is_ = tl.sum(tl.where(h_ok, A, 0.0), axis=0) / (Hf * L)
    ob = out_ptr + b.to(tl.int64) * s_outb
    tl.store(ob, ae)
    tl.store(ob + s_out, av)
    tl.store(ob + 3 * s_out, is_)


@triton.jit
def _sum_parts(part_ptr, row0, n, S_CHUNK: tl.constexpr):
    tot = tl.zeros([S_CHUNK], tl.float32)
    for c0 in range(0, n, S_CHUNK):
        ss = c0 + tl.arange(0, S_CHUNK)
        tot += tl.load(part_ptr + row0 + ss, mask=ss < n, other=0.0, volatile=True)
    return tl.sum(tot, axis=0)


#: The per-step ints of each pass (split count and keys per split, which change
#: with the batch size; the key bound, which changes with ``max_seq_len``; the
#: strides of the caller's figures and of a workspace sized by the call): never
#: specialised (``launch.py``, rule 1). And the pointers the passes read or
#: write one scalar through (lengths, arrival counters, figures): alignment
#: not specialised (rule 2).
PASS1_PER_STEP = ["NS", "TPS", "L_CAP", "plane", "head_plane", "s_out", "s_outb"]
PASS2_PER_STEP = ["NS", "TPS", "L_CAP", "s_res"]
SCALAR_POINTERS1 = ["len_ptr", "cnt_ptr", "out_ptr"]
SCALAR_POINTERS2 = ["len_ptr", "cnt_ptr", "res_ptr"]


@triton.jit(do_not_specialize=PASS1_PER_STEP, do_not_specialize_on_alignment=SCALAR_POINTERS1)
def _head_partials_kernel(
    q_ptr, k_ptr, bt_ptr, len_ptr,
    part_ptr,  # float32 [4, plane]: m, S0, S1, sum|s| of split row b * NS + sid, head h
    cnt_ptr,  # int32 [>= B], zero on entry; left zero (the last program resets it)
    head_ptr,  # float32 [3, head_plane]: lse (nats), entropy (bits), sum|s| at b * H + h
    out_ptr,  # float32 figures: figure f of request b at f * s_out + b * s_outb
    scale, H, NS, TPS, L_CAP, plane, head_plane, s_out, s_outb,
    sq_b, sq_h, sq_d,
    sk_n, sk_p, sk_h, sk_d,
    sbt_b, sbt_n,
    G: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, H_PAD: tl.constexpr,
    S_CHUNK: tl.constexpr, HALF_DOT: tl.constexpr,
):
    sid = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    L = tl.load(len_ptr + b).to(tl.int32)
    L = tl.minimum(tl.maximum(L, 0), L_CAP)
    KPS = TPS * BLOCK_N  # keys per split, a whole number of tiles
    start = sid * KPS
    if start < L:
        end = tl.minimum(start + KPS, L)
        rows = tl.arange(0, G_PAD)
        row_ok = rows < G
        h = g * G + rows
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        qv = _load_q(q_ptr, k_ptr, b, h, row_ok, d, d_ok, sq_b, sq_h, sq_d, HALF_DOT)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        s0 = tl.zeros([G_PAD], tl.float32)
        s1 = tl.zeros([G_PAD], tl.float32)
        a = tl.zeros([G_PAD], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * sbt_b
        kh_ptr = k_ptr + g.to(tl.int64) * sk_h
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            blk = tl.load(bt_row + (n // BS) * sbt_n, mask=n_ok, other=0).to(tl.int64)
            koff = blk * sk_n + (n % BS).to(tl.int64) * sk_p
            kv = tl.load(kh_ptr + koff[:, None] + d[None, :] * sk_d,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if HALF_DOT:
                s = tl.dot(qv, tl.trans(kv))
            else:
                s = tl.dot(qv, tl.trans(kv.to(tl.float32)), input_precision="ieee")
            s = s * scale
            valid = row_ok[:, None] & n_ok[None, :]
            m, s0, s1, a = _online_update(m, s0, s1, a, s, valid)

        poff = (b * NS + sid) * H + h
        tl.store(part_ptr + poff, m, mask=row_ok)
        tl.store(part_ptr + plane + poff, s0, mask=row_ok)
        tl.store(part_ptr + 2 * plane + poff, s1, mask=row_ok)
        tl.store(part_ptr + 3 * plane + poff, a, mask=row_ok)
        tl.debug_barrier()
        n_split = tl.cdiv(L, KPS)
        prev = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel")
        if prev == n_split * (H // G) - 1:
            # Last program of this request: merge its partials, in split order,
            # and leave the counter at zero for the next call.
            _finish_heads(part_ptr, plane, b * NS, n_split, head_ptr, head_plane, out_ptr,
                          s_out, s_outb, b, H, L, H_PAD, S_CHUNK)
            tl.atomic_xchg(cnt_ptr + b, 0)
    if (L == 0) & (sid == 0) & (g == 0):
        # no keys: zero figures (the caller's buffer is not zeroed beforehand)
        ob = out_ptr + b.to(tl.int64) * s_outb
        tl.store(ob, 0.0)
        tl.store(ob + s_out, 0.0)
        tl.store(ob + 3 * s_out, 0.0)


@triton.jit(do_not_specialize=PASS2_PER_STEP, do_not_specialize_on_alignment=SCALAR_POINTERS2)
def _agreement_kernel(
    q_ptr, k_ptr, bt_ptr, len_ptr, lse_ptr,
    part_ptr,  # float32 [>= B * NS]: per-program sums of |P - Pbar|
    cnt_ptr,  # int32 [>= B], zero on entry; left zero (the last program resets it)
    res_ptr,  # float32: agreement (NORMALIZE) or the raw sum of request b at b * s_res
    scale, H, NS, TPS, L_CAP, H_ROW, s_res,
    sq_b, sq_h, sq_d,
    sk_n, sk_p, sk_h, sk_d,
    sbt_b, sbt_n, slse_b, slse_h,
    G: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    S_CHUNK: tl.constexpr, HALF_DOT: tl.constexpr,
    REVERSE: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # Pbar = (sum over the heads of P) / H_ROW; accumulate |P - Pbar|.
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    if REVERSE:
        sid = NS - 1 - pid_s
        b = tl.num_programs(1) - 1 - pid_b
    else:
        sid = pid_s
        b = pid_b
    L = tl.load(len_ptr + b).to(tl.int32)
    L = tl.minimum(tl.maximum(L, 0), L_CAP)
    KPS = TPS * BLOCK_N
    start = sid * KPS
    if start < L:
        end = tl.minimum(start + KPS, L)
        hh = tl.arange(0, H_PAD)
        h_ok = hh < H
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        qv = _load_q(q_ptr, k_ptr, b, hh, h_ok, d, d_ok, sq_b, sq_h, sq_d, HALF_DOT)
        lse = tl.load(lse_ptr + b.to(tl.int64) * slse_b + hh * slse_h, mask=h_ok, other=0.0)
        r = tl.arange(0, HKV_PAD * BLOCK_N)
        r_g = r // BLOCK_N
        r_j = r % BLOCK_N
        gsel = (tl.arange(0, HKV_PAD)[None, :, None] == (hh // G)[:, None, None]) \
            & h_ok[:, None, None]
        bt_row = bt_ptr + b.to(tl.int64) * sbt_b
        acc = tl.zeros([BLOCK_N], tl.float32)
        n_tiles = tl.cdiv(end - start, BLOCK_N)
        for t in range(0, n_tiles):
            if REVERSE:
                n0 = start + (n_tiles - 1 - t) * BLOCK_N
            else:
                n0 = start + t * BLOCK_N
            s = _all_head_scores(qv, k_ptr, bt_row, n0, end, r_g, r_j, d, d_ok, gsel, scale,
                                 sk_n, sk_p, sk_h, sk_d, sbt_n,
                                 HKV, HKV_PAD, BS, BLOCK_N, H_PAD, HALF_DOT)
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            valid = h_ok[:, None] & n_ok[None, :]
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            pbar = tl.sum(p, axis=0) / H_ROW
            acc += tl.sum(tl.where(valid, tl.abs(p - pbar[None, :]), 0.0), axis=0)
        tl.store(part_ptr + b * NS + sid, tl.sum(acc, axis=0))
        tl.debug_barrier()
        n_split = tl.cdiv(L, KPS)
        prev = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel")
        if prev == n_split - 1:
            total = _sum_parts(part_ptr, b * NS, n_split, S_CHUNK)
            if NORMALIZE:
                total = total / (H_ROW * L)
            tl.store(res_ptr + b.to(tl.int64) * s_res, total)
            tl.atomic_xchg(cnt_ptr + b, 0)
    if (L == 0) & (sid == 0):
        tl.store(res_ptr + b.to(tl.int64) * s_res, 0.0)


# ----------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _sms(device: torch.device) -> int:
    """The SM count the split counts aim at (1 under the interpreter: few programs)."""
    prof = launch.device_profile(device)
    return prof.sms if prof.gpu else 1


def _target_splits1(B: int, HKV: int, sms: int) -> int:
    """Pass 1's split count before rounding to tiles: about 4 programs per SM."""
    return max(1, min(64, -(-4 * sms // (max(B, 1) * HKV))))


def _target_splits2(B: int, sms: int) -> int:
    return max(1, min(1024, -(-4 * sms // max(B, 1))))


@dataclass(frozen=True)
class _Plan:
    B: int
    H: int
    HKV: int
    G: int
    D: int
    BS: int
    L_CAP: int
    bound: int
    half_dot: bool
    D_PAD: int
    G_PAD: int
    H_PAD: int
    HKV_PAD: int
    block_n1: int
    tps1: int  # tiles (of block_n1 keys) per split
    ns1: int
    block_n2: int
    tps2: int
    ns2: int
    num_warps1: int
    num_warps2: int
    num_stages1: int
    num_stages2: int
    reverse: bool

    @property
    def rows1(self) -> int:
        """Rows of pass 1's partials (``B * ns1``; each ``H`` floats per quantity)."""
        return self.B * self.ns1

    @property
    def rows2(self) -> int:
        return self.B * self.ns2


def _check_inputs(q, key_cache, block_table, seq_lens):
    if key_cache.dtype not in _FLOAT_DTYPES:
        if "float8" in str(key_cache.dtype) or key_cache.dtype in (torch.uint8, torch.int8):
            raise TypeError(
                f"key_cache: quantized (fp8) KV caches are not supported by the attention "
                f"statistics kernel; got dtype {key_cache.dtype} (use kv_cache_dtype='auto', "
                f"i.e. float32, float16 or bfloat16)")
        raise TypeError(f"key_cache: expected float32, float16 or bfloat16, got {key_cache.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q: expected [B, H, D], got shape {tuple(q.shape)}")
    if key_cache.dim() != 4:
        raise ValueError("key_cache: expected [num_blocks, block_size, H_kv, D], got shape "
                         f"{tuple(key_cache.shape)}")
    B, H, D = q.shape
    _, BS, HKV, Dk = key_cache.shape
    if Dk != D:
        raise ValueError(f"key_cache head size {Dk} != query head size {D}")
    if HKV < 1 or H % HKV != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({HKV})")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table: expected [{B}, max_blocks], got {tuple(block_table.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table: expected int32 or int64, got {block_table.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens: expected [{B}], got {tuple(seq_lens.shape)}")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_lens: expected int32 or int64, got {seq_lens.dtype}")
    dev = q.device
    for name, t in (("key_cache", key_cache), ("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, q on {dev}")
    if not launch.device_profile(dev).gpu and not _interpreting():
        raise RuntimeError("triton attention statistics need CUDA tensors (or TRITON_INTERPRET=1 "
                           "set before entropix_vllm.triton_kernels is imported, for CPU tensors)")


_PLANS: dict = {}


def _plan(q, key_cache, block_table, seq_lens, max_seq_len=None, **tuning) -> _Plan:
    """Validated launch plan, cached per shapes / dtypes / devices / options
    (host overhead matters at decode time; the plan never reads tensor data)."""
    key = (q.shape, q.dtype, q.device, key_cache.shape, key_cache.dtype, key_cache.device,
           block_table.shape, block_table.dtype, block_table.device, seq_lens.shape,
           seq_lens.dtype, seq_lens.device, max_seq_len, _interpreting(),
           tuple(sorted(tuning.items())))
    p = _PLANS.get(key)
    if p is None:
        p = _make_plan(q, key_cache, block_table, seq_lens, max_seq_len, **tuning)
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = p
    return p


def _make_plan(q, key_cache, block_table, seq_lens, max_seq_len=None, *, block_n1=None,
               keys_per_split1=None, block_n2=None, keys_per_split2=None, num_warps1=None,
               num_warps2=None, num_stages1=None, num_stages2=None, reverse=True,
               half_dot=None) -> _Plan:
    _check_inputs(q, key_cache, block_table, seq_lens)
    B, H, D = q.shape
    BS, HKV = key_cache.shape[1], key_cache.shape[2]
    G = H // HKV
    capacity = block_table.shape[1] * BS
    bound = capacity if max_seq_len is None else max(1, min(int(max_seq_len), capacity))
    bound = max(bound, 1)
    gpu = launch.device_profile(q.device).gpu
    if half_dot is None:
        half_dot = (gpu and q.dtype == key_cache.dtype and q.dtype in _HALF_DTYPES)
    D_PAD = max(16, launch.next_pow2(D))
    G_PAD = max(16, launch.next_pow2(G))
    H_PAD = max(16, launch.next_pow2(H))
    HKV_PAD = launch.next_pow2(HKV)
    sms = _sms(q.device)

    # Tile sizes picked from register counts of sm_90 builds (no spills): the
    # fp32 path multiplies with FMAs and needs smaller tiles / more warps.
    wide = D_PAD <= 128
    if half_dot:
        bn1 = block_n1 or (128 if wide else 64)
        rows2 = 64 if wide else 32
        warps = 4
        warps1 = 8
    else:
        bn1 = block_n1 or (32 if wide else 16)
        rows2 = 64 if wide else 32
        warps = 8
        warps1 = 8
    if keys_per_split1:
        kps1 = _round_up(int(keys_per_split1), bn1)
    else:
        kps1 = _round_up(-(-bound // _target_splits1(B, HKV, sms)), bn1)
    ns1 = -(-bound // kps1)

    bn2 = block_n2 or max(rows2 // HKV_PAD, -(-16 // HKV_PAD), 1)
    if keys_per_split2:
        kps2 = _round_up(int(keys_per_split2), bn2)
    else:
        kps2 = _round_up(-(-bound // _target_splits2(B, sms)), bn2)
    ns2 = -(-bound // kps2)

    return _Plan(B=B, H=H, HKV=HKV, G=G, D=D, BS=BS, L_CAP=bound, bound=bound,
                 half_dot=bool(half_dot), D_PAD=D_PAD, G_PAD=G_PAD, H_PAD=H_PAD,
                 HKV_PAD=HKV_PAD, block_n1=bn1, tps1=kps1 // bn1, ns1=ns1, block_n2=bn2,
                 tps2=kps2 // bn2, ns2=ns2, num_warps1=num_warps1 or warps1,
                 num_warps2=num_warps2 or warps, num_stages1=num_stages1 or 3,
                 num_stages2=num_stages2 or 2, reverse=bool(reverse))


# ----------------------------------------------------------------------------
# Workspace: every scratch buffer of both passes, allocated once
# ----------------------------------------------------------------------------
def workspace_rows(max_batch: int, num_kv_heads: int, device: torch.device) -> tuple:
    """``(rows1, rows2)``: the partial rows (``B * splits``) the default plans of
    any batch ``B <= max_batch`` need on ``device``, whatever the key capacity
    (a plan's split count never exceeds its target, ``_target_splits*``)."""
    sms = _sms(device)
    r1 = max((b * _target_splits1(b, num_kv_heads, sms) for b in range(1, max_batch + 1)),
             default=0)
    r2 = max((b * _target_splits2(b, sms) for b in range(1, max_batch + 1)), default=0)
    return r1, r2


def make_workspace(max_batch: int, num_heads: int, num_kv_heads: int, device,
                   rows: Optional[tuple] = None) -> AttnWorkspace:
    """The scratch of :func:`paged_attention_stats` for up to ``max_batch``
    requests of ``num_heads`` query and ``num_kv_heads`` kv heads on ``device``
    (``ops.attention_workspace``): one float32 buffer (pass 1's partials
    ``[4, rows1 * H]``, the per-head results ``[3, max_batch * H]``, pass 2's
    partials ``[rows2]``, each region starting on a 16-byte boundary) and one
    int32 buffer of arrival counters ``[2, max_batch]``, zeroed here once: the
    kernels leave them at zero. ``rows``: ``(rows1, rows2)``, by default
    :func:`workspace_rows` (enough for every default plan)."""
    device = launch.tensor_device(device)
    max_batch, H = int(max_batch), int(num_heads)
    if max_batch < 0 or H < 1 or num_kv_heads < 1 or H % num_kv_heads:
        raise ValueError(f"workspace: max_batch >= 0 and num_heads a multiple of num_kv_heads "
                         f"expected, got {max_batch}, {num_heads}, {num_kv_heads}")
    r1, r2 = workspace_rows(max_batch, num_kv_heads, device) if rows is None else rows
    al = launch.aligned
    plane1, plane_h, n2 = al(r1 * H, 4), al(max_batch * H, 4), al(r2, 4)
    scratch = torch.empty(4 * plane1 + 3 * plane_h + n2, dtype=torch.float32, device=device)
    nc = al(max_batch, 4)
    counters = torch.zeros(2 * nc, dtype=torch.int32, device=device)
    o_h = 4 * plane1
    o_2 = o_h + 3 * plane_h
    views = dict(part1=scratch[:o_h], head=scratch[o_h:o_2], part2=scratch[o_2:],
                 cnt1=counters[:nc], cnt2=counters[nc:], plane1=plane1, plane_h=plane_h)
    return AttnWorkspace(backend="triton", max_batch=max_batch, num_heads=H,
                         num_kv_heads=int(num_kv_heads), device=device, scratch=scratch,
                         counters=counters, rows=(r1, r2), views=views)


def _check_workspace(ws: AttnWorkspace, p: _Plan, device) -> None:
    if ws.backend != "triton" or ws.scratch is None:
        raise ValueError(f"workspace: made for the {ws.backend!r} backend, not 'triton' "
                         "(ops.attention_workspace with the backend of the call)")
    if ws.device != device:
        raise ValueError(f"workspace is on {ws.device}, q on {device}")
    if p.B > ws.max_batch or p.H != ws.num_heads or p.HKV != ws.num_kv_heads:
        raise ValueError(f"workspace: made for <= {ws.max_batch} requests of {ws.num_heads} "
                         f"heads ({ws.num_kv_heads} kv), called with {p.B} of {p.H} ({p.HKV})")
    if p.rows1 > ws.rows[0] or p.rows2 > ws.rows[1]:
        raise ValueError(f"workspace: this launch plan needs {p.rows1} / {p.rows2} partial rows, "
                         f"the workspace holds {ws.rows[0]} / {ws.rows[1]} (a tuning override "
                         "asks for more splits than the default plans: make the workspace with "
                         "rows=...)")


def _check_out(out: torch.Tensor, B: int, device) -> None:
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != 4 or out.shape[1] < B:
        raise ValueError(f"out: expected a float32 [4, >= {B}] tensor, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, q on {device}")


def _launch_pass1(p: _Plan, q, key_cache, block_table, seq_lens, scale, ws: AttnWorkspace,
                  out: torch.Tensor):
    v = ws.views
    grid = (p.ns1, p.HKV, p.B)
    _head_partials_kernel[grid](
        q, key_cache, block_table, seq_lens, v["part1"], v["cnt1"], v["head"], out,
        float(scale), p.H, p.ns1, p.tps1, p.L_CAP, v["plane1"], v["plane_h"],
        out.stride(0), out.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
        block_table.stride(0), block_table.stride(1),
        G=p.G, BS=p.BS, BLOCK_N=p.block_n1, D=p.D, D_PAD=p.D_PAD, G_PAD=p.G_PAD,
        H_PAD=p.H_PAD, S_CHUNK=16, HALF_DOT=p.half_dot,
        num_warps=p.num_warps1, num_stages=p.num_stages1,
    )


def _launch_pass2(p: _Plan, q, key_cache, block_table, seq_lens, scale, lse, ws: AttnWorkspace,
                  res: torch.Tensor, h_row: float, normalize: bool):
    v = ws.views
    grid = (p.ns2, p.B)
    _agreement_kernel[grid](
        q, key_cache, block_table, seq_lens, lse, v["part2"], v["cnt2"], res,
        float(scale), p.H, p.ns2, p.tps2, p.L_CAP, float(h_row), res.stride(0),
        q.stride(0), q.stride(1), q.stride(2),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
        block_table.stride(0), block_table.stride(1), lse.stride(0), lse.stride(1),
        G=p.G, HKV=p.HKV, HKV_PAD=p.HKV_PAD, BS=p.BS, BLOCK_N=p.block_n2, D=p.D,
        D_PAD=p.D_PAD, H_PAD=p.H_PAD, S_CHUNK=128, HALF_DOT=p.half_dot,
        REVERSE=p.reverse, NORMALIZE=normalize,
        num_warps=p.num_warps2, num_stages=p.num_stages2,
    )


def _call_workspace(p: _Plan, device, workspace: Optional[AttnWorkspace]) -> AttnWorkspace:
    if workspace is None:  # one for this call, exactly the plan's size
        return make_workspace(p.B, p.H, p.HKV, device, rows=(p.rows1, p.rows2))
    _check_workspace(workspace, p, device)
    return workspace


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------
def paged_attention_stats(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float,
                          max_seq_len: Optional[int] = None, *,
                          out: Optional[torch.Tensor] = None,
                          workspace: Optional[AttnWorkspace] = None, **tuning) -> AttnStats:
    """The four figures of SPEC section 2 per request (float32 ``[B]`` each).

    q ``[B, H, D]``; key_cache ``[num_blocks, block_size, H_kv, D]`` (any
    strides); block_table ``[B, max_blocks]`` int32/int64; seq_lens ``[B]``
    int32/int64 (a row with 0 keys gives zeros); ``scale`` the model's softmax
    scale (a Python float). ``max_seq_len`` (optional Python int >=
    max(seq_lens)) sizes the grid; without it the grid covers
    ``block_table.shape[1] * block_size`` keys (programs past a request's
    length exit at once).

    ``out``: a float32 ``[4, >= B]`` buffer (any strides) that receives the
    figures in columns ``0..B-1`` (rows: attn_entropy, attn_varentropy,
    agreement, interaction_strength); the result is its views. ``workspace``:
    from :func:`make_workspace` (``ops.attention_workspace``) for at least B
    requests of these heads. With both, a call allocates nothing, reads no
    value back to the host and launches two kernels whose grids depend only on
    B and the block table's shape: it can be captured in a CUDA graph and
    replayed with new queries, tables and lengths in the same tensors. Calls
    sharing a workspace must not run concurrently (one stream).

    ``tuning`` overrides launch parameters (``block_n1``,
    ``keys_per_split1``, ``block_n2``, ``keys_per_split2``, ``num_warps1/2``,
    ``num_stages1/2``, ``reverse``, ``half_dot``); for tests and benchmarks.
    """
    p = _plan(q, key_cache, block_table, seq_lens, max_seq_len, **tuning)
    dev = q.device
    B = p.B
    if out is None:
        out = torch.empty((4, launch.aligned(B, 4)), dtype=torch.float32, device=dev)
    else:
        _check_out(out, B, dev)
    if B:
        ws = _call_workspace(p, dev, workspace)
        _launch_pass1(p, q, key_cache, block_table, seq_lens, scale, ws, out)
        lse = ws.views["head"][:B * p.H].view(B, p.H)
        _launch_pass2(p, q, key_cache, block_table, seq_lens, scale, lse, ws, out[2],
                      h_row=p.H, normalize=True)
    return AttnStats(attn_entropy=out[0, :B], attn_varentropy=out[1, :B],
                     agreement=out[2, :B], interaction_strength=out[3, :B])


@dataclass
class HeadStats:
    """Per-head results of pass 1 (float32 ``[B, H]``; rows with 0 keys are
    unspecified)."""

    lse: torch.Tensor  # logsumexp_k s_hk (natural log)
    entropy: torch.Tensor  # e_h, bits
    abs_sum: torch.Tensor  # sum_k |s_hk|


def head_stats(q, key_cache, block_table, seq_lens, scale, max_seq_len=None,
               **tuning) -> HeadStats:
    """Pass 1 alone (benchmarks): the per-head results."""
    p = _plan(q, key_cache, block_table, seq_lens, max_seq_len, **tuning)
    dev = q.device
    if p.B == 0:
        z = torch.zeros((0, p.H), dtype=torch.float32, device=dev)
        return HeadStats(lse=z, entropy=z.clone(), abs_sum=z.clone())
    ws = make_workspace(p.B, p.H, p.HKV, dev, rows=(p.rows1, p.rows2))
    out = torch.empty((4, launch.aligned(p.B, 4)), dtype=torch.float32, device=dev)
    _launch_pass1(p, q, key_cache, block_table, seq_lens, scale, ws, out)
    head = ws.views["head"].view(3, ws.views["plane_h"])[:, :p.B * p.H].view(3, p.B, p.H)
    return HeadStats(lse=head[0], entropy=head[1], abs_sum=head[2])


def agreement_abs_sum(q, key_cache, block_table, seq_lens, scale, lse, max_seq_len=None,
                      **tuning) -> torch.Tensor:
    """Pass 2 alone (benchmarks): ``[B]`` float32 ``sum_{h,k} |P_hk - Pbar_k|``
    with ``lse`` ``[B, H]`` from :func:`head_stats` (0 for rows with 0 keys)."""
    p = _plan(q, key_cache, block_table, seq_lens, max_seq_len, **tuning)
    dev = q.device
    res = torch.empty(p.B, dtype=torch.float32, device=dev)
    if p.B:
        ws = make_workspace(p.B, p.H, p.HKV, dev, rows=(p.rows1, p.rows2))
        _launch_pass2(p, q, key_cache, block_table, seq_lens, scale, lse, ws, res,
                      h_row=p.H, normalize=False)
    return res
