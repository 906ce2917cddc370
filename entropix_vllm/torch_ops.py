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
from .config import COEFF_NAMES
from .contract import (ARGMAX, INSERT_COT, K_MAX, MIN_P_MAX, MIN_P_MIN,
                       TOP_P_MAX, TOP_P_MIN, AttnStats,
                       BranchParams, LogitStats)



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
def decide_and_sample(entropy, varentropy, attn, coeff_table, cand_vals, cand_ids,
                      noise, argmax, cot_token, prev_is_cot, logits):
    """The decision and draw as tensor ops (what the fused kernels equal bit for
    bit); the table's columns are ``config.COEFF_NAMES``."""
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
