"""The torch version of every op of ``ops.py`` (the ``"torch"`` backend).

Plain torch on any device, built on the float64 reference where the reference
has the op; what runs when neither Triton (CUDA) nor the C++ extension (CPU)
is available, and what the fast paths are compared with. Same signatures as
the other backends' implementations (``ops.py`` documents the contract of
each op and validates its arguments).
"""

from __future__ import annotations

import torch

from . import reference
from .config import EntropixConfig
from .contract import (ARGMAX, INSERT_COT, K_MAX, MIN_P_MAX, MIN_P_MIN, NOISE_DOMAIN,
                       NOISE_OFFSET_STRIDE, NOISE_SERIES_BELOW, TOP_P_MAX, TOP_P_MIN, AttnStats,
                       BranchParams, LogitStats)

#: The columns of a coefficient table (contract.py): EntropixConfig's fields.
COEFF_NAMES = EntropixConfig.field_names()


# ----------------------------------------------------------------------------
# logit_stats
# ----------------------------------------------------------------------------
def logit_stats_and_candidates(logits: torch.Tensor, num_candidates: int):
    """``(LogitStats, cand_vals, cand_ids)``; ``None`` candidates for 0."""
    s = reference.logit_stats(logits, torch.float64)
    stats = LogitStats(s.max.float(), s.argmax, s.logsumexp.float(), s.entropy.float(),
                       s.varentropy.float())
    if num_candidates == 0:
        return stats, None, None
    cv, ci = reference.topk_candidates(logits, num_candidates)
    return stats, cv, ci


# ----------------------------------------------------------------------------
# sample_candidates
# ----------------------------------------------------------------------------
def sample_candidates(cand_vals, cand_ids, temperature, top_k, top_p, min_p, n_draws,
                      noise) -> torch.Tensor:
    """Candidate draw on :func:`reference.filter_logits` and :func:`reference.race`."""
    f = reference.filter_logits(cand_vals, temperature.double(), top_k, top_p.double(),
                                min_p.double())
    vals = cand_vals.double()
    best_c = reference.race(f, noise[:, 0].double())
    best_v = torch.gather(vals, 1, best_c[:, None])[:, 0]
    for j in range(1, noise.shape[1]):
        c = reference.race(f, noise[:, j].double())
        v = torch.gather(vals, 1, c[:, None])[:, 0]
        better = (j < n_draws) & (v > best_v)
        best_c = torch.where(better, c, best_c)
        best_v = torch.where(better, v, best_v)
    return torch.gather(cand_ids, 1, best_c[:, None])[:, 0].long()


# ----------------------------------------------------------------------------
# decide_and_sample
# ----------------------------------------------------------------------------
def decide_and_sample(entropy, varentropy, attn, coeff_table, columns, cand_vals, cand_ids,
                      noise, argmax, cot_token, prev_is_cot, logits):
    """The decision and draw as tensor ops (what the fused kernels equal bit for
    bit). ``columns`` is unused: the table's columns are :data:`COEFF_NAMES`."""
    del columns
    B, V = logits.shape
    coeffs = {n: coeff_table[:, i] for i, n in enumerate(COEFF_NAMES)}
    if attn is None:
        attn = AttnStats.zeros(B, device=entropy.device)
    p64 = reference.branch_params(entropy, varentropy, attn, coeffs, dtype=torch.float64)
    params = BranchParams(
        branch=p64.branch, temperature=p64.temperature.float(), top_k=p64.top_k,
        top_p=p64.top_p.float(), min_p=p64.min_p.float(), n_draws=p64.n_draws)
    one = torch.ones_like(params.temperature)
    sane = torch.isfinite(entropy) & torch.isfinite(varentropy)
    draw_ok = sane & (params.branch != ARGMAX) & (params.temperature > 0)
    drawn = sample_candidates(
        cand_vals, cand_ids,
        torch.where(draw_ok, params.temperature, one),
        params.top_k.clamp(1, K_MAX),
        torch.where(draw_ok, params.top_p.clamp(TOP_P_MIN, TOP_P_MAX), one),
        torch.where(draw_ok, params.min_p.clamp(MIN_P_MIN, MIN_P_MAX), torch.zeros_like(one)),
        params.n_draws.clamp(1, noise.shape[1]),
        noise)
    tokens = torch.where(draw_ok, drawn, argmax)
    cot = cot_token.to(device=logits.device, dtype=torch.int64)
    cot_logit = torch.gather(logits, 1, cot.clamp(0, V - 1)[:, None])[:, 0]
    emit_cot = ((params.branch == INSERT_COT) & sane & (cot >= 0) & (cot < V)
                & torch.isfinite(cot_logit) & ~prev_is_cot.to(logits.device))
    return torch.where(emit_cot, cot, tokens), params


# ----------------------------------------------------------------------------
# seeded_noise: murmur3_32 on int64 tensors holding uint32 values (the same
# hash as the Triton kernel of triton_kernels/seeded_noise.py)
# ----------------------------------------------------------------------------
_C1, _C2, _M5, _F1, _F2 = 0xCC9E2D51, 0x1B873593, 0xE6546B64, 0x85EBCA6B, 0xC2B2AE35
_NUM_WORDS = 5
_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2**32 for 0 <= a, c < 2**32 without int64 overflow.
    lo = (a & 0xFFFF) * c
    hi = (((a >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _rotl(v: torch.Tensor, s: int) -> torch.Tensor:
    return ((v << s) | (v >> (32 - s))) & _M32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _mul32(k, _C1)
    k = _rotl(k, 15)
    k = _mul32(k, _C2)
    h = h ^ k
    h = _rotl(h, 13)
    return (_mul32(h, 5) + _M5) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return h ^ (h >> 16)


def noise_hash(seeds: torch.Tensor, positions: torch.Tensor, num_draws: int,
               num_candidates: int) -> torch.Tensor:
    """The 32-bit hashes ``[B, N, K]`` (int64 holding uint32) behind the noise."""
    s = seeds.to(torch.int64)
    p = positions.to(torch.int64)
    h = torch.full_like(s, NOISE_DOMAIN)
    h = _mix(h, s & _M32)
    h = _mix(h, (s >> 32) & _M32)
    h = _mix(h, p & _M32)
    h = _mix(h, (p >> 32) & _M32)
    dev = seeds.device
    offs = (torch.arange(num_draws, dtype=torch.int64, device=dev)[:, None] * NOISE_OFFSET_STRIDE
            + torch.arange(num_candidates, dtype=torch.int64, device=dev)[None, :])
    h = _mix(h[:, None, None].expand(-1, num_draws, num_candidates), offs[None])
    return _fmix(h ^ (4 * _NUM_WORDS))


def seeded_exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, num_draws: int,
                             num_candidates: int) -> torch.Tensor:
    """The same noise as the Triton kernel (a few ulp apart: ``log`` differs)."""
    h = noise_hash(seeds, positions, num_draws, num_candidates)
    f32 = torch.float32
    hi = (h >> 16).to(f32)
    lo = (h & 0xFFFF).to(f32)

    def c(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=f32, device=h.device)

    u = hi * c(1.52587890625e-05) + (lo + c(0.5)) * c(2.3283064365386963e-10)
    w = (c(65535.0) - hi) * c(1.52587890625e-05) + ((c(65535.0) - lo) + c(0.5)) * c(
        2.3283064365386963e-10)
    poly = c(0.125).expand_as(u)
    for k in (0.14285714285714285, 0.16666666666666666, 0.2, 0.25, 0.3333333333333333, 0.5,
              1.0):
        poly = c(k) + u * poly
    series = u * poly
    direct = -torch.log(w)
    return torch.where(u < c(NOISE_SERIES_BELOW), series, direct).contiguous()


# ----------------------------------------------------------------------------
# paged_attention_stats
# ----------------------------------------------------------------------------
def copy_attn_stats(st: AttnStats, out=None) -> AttnStats:
    """``st`` itself, or copied into ``out[:, :B]`` and returned as its views
    (the ``out=`` of ``ops.paged_attention_stats`` for backends that allocate)."""
    if out is None:
        return st
    B = st.attn_entropy.shape[0]
    fields = ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")
    for i, f in enumerate(fields):
        out[i, :B].copy_(getattr(st, f))
    return AttnStats(*(out[i, :B] for i in range(4)))


def paged_attention_stats(q, key_cache, block_table, seq_lens, scale, out=None,
                          workspace=None) -> AttnStats:
    """Gathers each sequence's keys and runs :func:`reference.attention_stats`
    (reads the lengths on the host; ``workspace`` unused)."""
    del workspace
    keys = [reference.gather_paged(key_cache, block_table[b], int(seq_lens[b]))
            for b in range(q.shape[0])]
    s = reference.attention_stats(q, keys, scale)
    st = AttnStats(*(getattr(s, f).float() for f in
                     ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")))
    return copy_attn_stats(st, out)
