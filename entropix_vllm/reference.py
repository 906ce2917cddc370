"""The reference implementation of SPEC sections 1-4: plain torch, readable,
float64 by default. It is the oracle that every fast path is tested against.

Conventions (shared by every backend):

* logits are ``[B, V]``; ``-inf`` entries are masked tokens.
* a row whose entries are all ``-inf`` gives ``max = logsumexp = -inf``,
  ``entropy = varentropy = 0`` and ``argmax = 0``;
* a row holding a NaN or ``+inf`` gives NaN for ``max``, ``logsumexp``,
  ``entropy`` and ``varentropy`` and ``argmax = 0`` (the sampler treats such a
  row as invalid; it never crashes on it).
* argmax ties resolve to the lowest token id.
* entropy is in bits, varentropy in bits^2.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Mapping, Optional, Sequence, Union

import torch

from .config import EntropixConfig
# The result types and branch codes every backend shares (contract.py owns them).
from .contract import (ADAPTIVE, ARGMAX, BRANCH_NAMES, EXPLORE, INSERT_COT,  # noqa: F401
                       RESAMPLE, AttnStats, BranchParams, LogitStats)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# Section 1: logit statistics
# ----------------------------------------------------------------------------
def logit_stats(logits: torch.Tensor, dtype: torch.dtype = torch.float64) -> LogitStats:
    """Max, argmax, logsumexp, entropy (bits) and varentropy (bits^2) per row.

    Computed by the definition (two passes: log-probabilities, then the moments
    around the entropy) in ``dtype``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    x = logits.to(dtype)
    B = x.shape[0]
    invalid = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    finite = torch.isfinite(x)
    empty = ~finite.any(-1) & ~invalid

    x_safe = torch.where(finite, x, torch.full_like(x, -math.inf))
    m = x_safe.max(-1).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = x_safe - m_safe[:, None]
    e = torch.where(finite, torch.exp(d), torch.zeros_like(d))
    s0 = e.sum(-1)
    log_s0 = torch.log(torch.where(s0 > 0, s0, torch.ones_like(s0)))
    logp = torch.where(finite, d - log_s0[:, None], torch.zeros_like(d))
    p = e / torch.where(s0 > 0, s0, torch.ones_like(s0))[:, None]
    h_nats = -(p * logp).sum(-1)
    v_nats = (p * (logp + h_nats[:, None]) ** 2).sum(-1)

    entropy = h_nats / LN2
    varentropy = v_nats / (LN2 * LN2)
    lse = m_safe + log_s0
    lse = torch.where(empty, torch.full_like(lse, -math.inf), lse)
    mx = torch.where(empty, torch.full_like(m, -math.inf), m)
    # argmax of the finite entries, lowest id on ties (torch.argmax returns the
    # first maximal index).
    am = torch.argmax(x_safe, dim=-1)
    am = torch.where(empty | invalid, torch.zeros_like(am), am)
    nan = torch.full((B,), math.nan, dtype=dtype, device=x.device)
    return LogitStats(
        max=torch.where(invalid, nan, mx),
        argmax=am,
        logsumexp=torch.where(invalid, nan, lse),
        entropy=torch.where(invalid, nan, entropy),
        varentropy=torch.where(invalid, nan, varentropy),
    )


def topk_candidates(logits: torch.Tensor, k: int):
    """The ``k`` largest logits per row, descending, and their token ids.

    Rows with fewer than ``k`` finite entries are padded with ``-inf`` values;
    padding ids are unspecified valid ids (never sampled: their value is -inf).
    Returns ``(values [B, k] float32, ids [B, k] int64)``.
    """
    B, V = logits.shape
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)
    kk = min(k, V)
    vals, ids = torch.topk(x, kk, dim=-1, largest=True, sorted=True)
    if kk < k:
        pad_v = torch.full((B, k - kk), -math.inf, dtype=vals.dtype, device=x.device)
        pad_i = torch.zeros((B, k - kk), dtype=ids.dtype, device=x.device)
        vals, ids = torch.cat([vals, pad_v], -1), torch.cat([ids, pad_i], -1)
    return vals, ids


# ----------------------------------------------------------------------------
# Section 2: attention statistics
# ----------------------------------------------------------------------------
def attention_stats(q: torch.Tensor, keys: Union[torch.Tensor, Sequence[torch.Tensor]],
                    scale: float, seq_lens: Optional[Sequence[int]] = None,
                    dtype: torch.dtype = torch.float64) -> AttnStats:
    """Attention figures for one query position per sequence (dense inputs).

    q:     ``[B, H, D]``, the chosen layer's query of each sequence's position
           whose next token is being sampled (after rotary embedding).
    keys:  per sequence ``[L_b, H_kv, D]`` (a list), or a padded
           ``[B, L_max, H_kv, D]`` tensor with ``seq_lens``.
    scale: the model's softmax scale (usually ``D ** -0.5``).
    Query head ``h`` reads kv head ``h // (H // H_kv)``.
    """
    B, H, D = q.shape
    if isinstance(keys, torch.Tensor) and keys.dim() == 4:
        lens = list(seq_lens) if seq_lens is not None else [keys.shape[1]] * B
        keys = [keys[b, : lens[b]] for b in range(B)]
    out = {f.name: [] for f in fields(AttnStats)}
    for b in range(B):
        k = keys[b].to(dtype)
        L, Hkv, _ = k.shape
        if L == 0:
            for name in out:
                out[name].append(torch.zeros((), dtype=dtype))
            continue
        group = H // Hkv
        k_per_q = k[:, torch.arange(H) // group, :]  # [L, H, D]
        s = scale * torch.einsum("hd,lhd->hl", q[b].to(dtype), k_per_q)  # [H, L]
        logp = torch.log_softmax(s, dim=-1)
        p = logp.exp()
        e_h = -(p * logp).sum(-1) / LN2
        ae = e_h.mean()
        out["attn_entropy"].append(ae)
        out["attn_varentropy"].append(((e_h - ae) ** 2).mean())
        out["agreement"].append((p - p.mean(0, keepdim=True)).abs().mean())
        out["interaction_strength"].append(s.abs().mean())
    return AttnStats(**{k: torch.stack(v) for k, v in out.items()})


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions ``0..seq_len-1`` of one sequence from a paged cache
    ``[num_blocks, block_size, H_kv, D]`` through its block-table row."""
    bs = cache.shape[1]
    pos = torch.arange(seq_len)
    blocks = block_table[pos // bs].long()
    return cache[blocks, pos % bs]


# ----------------------------------------------------------------------------
# Section 3: branches and per-branch sampling parameters
# ----------------------------------------------------------------------------
Params = Mapping[str, Union[float, int, torch.Tensor]]


def config_tensors(configs: Sequence[EntropixConfig], device=None,
                   dtype: torch.dtype = torch.float64) -> dict:
    """Per-row coefficient tensors ``{name: [B]}`` from per-row configs."""
    names = EntropixConfig.field_names()
    return {n: torch.tensor([getattr(c, n) for c in configs], dtype=dtype, device=device)
            for n in names}


def select_branch(ent: torch.Tensor, vent: torch.Tensor, c: Params) -> torch.Tensor:
    """Branch code per row (SPEC section 3, first matching rule wins)."""
    code = torch.full(ent.shape, ADAPTIVE, dtype=torch.int64, device=ent.device)
    rules = [
        (ARGMAX, (ent < c["low_ent_thresh"]) & (vent < c["low_vent_thresh"])),
        (INSERT_COT, (ent > c["high_ent_thresh"]) & (vent < c["low_vent_thresh"])),
        (EXPLORE, (ent < c["high_ent_thresh"]) & (vent > c["high_vent_thresh"])),
        (RESAMPLE, (ent > c["med_ent_thresh"]) & (vent > c["high_vent_thresh"])),
    ]
    for branch, cond in reversed(rules):  # earlier rules override later ones
        code = torch.where(cond, torch.full_like(code, branch), code)
    return code


def branch_params(ent: torch.Tensor, vent: torch.Tensor, attn: AttnStats, c: Params,
                  dtype: torch.dtype = torch.float64) -> BranchParams:
    """Branch code and its (T, top_k, top_p, min_p, n_draws) per row.

    Argmax rows get ``T = 0, top_k = 1, top_p = 1, min_p = 0`` (greedy).
    """
    ent, vent = ent.to(dtype), vent.to(dtype)
    aE, aV = attn.attn_entropy.to(dtype), attn.attn_varentropy.to(dtype)
    agr, IS = attn.agreement.to(dtype), attn.interaction_strength.to(dtype)

    def t(name):
        v = c[name]
        return v.to(dtype) if isinstance(v, torch.Tensor) else torch.full_like(ent, float(v))

    T0, P0, K0, M0 = t("temperature"), t("top_p"), t("top_k"), t("min_p")
    code = select_branch(ent, vent, c)
    zeros, ones = torch.zeros_like(ent), torch.ones_like(ent)

    # insert CoT (fallback sampling parameters)
    T_cot = torch.minimum(t("helv_max_temp"), T0 * (t("helv_attn_ent_offset") + t("helv_attn_ent_coef") * aE))
    # explore
    T_exp = torch.minimum(t("lehv_max_temp"),
                          T0 * (t("lehv_interaction_strength_offset") + t("lehv_interaction_strength_coef") * IS))
    K_exp = torch.maximum(t("lehv_min_top_k"), torch.floor(K0 * (1 + t("lehv_top_k_agree_coef") * (1 - agr))))
    # resample
    T_res = torch.maximum(t("hehv_min_temp"), T0 * (t("hehv_attn_vent_offset") + t("hehv_attn_vent_coef") * aV))
    P_res = torch.maximum(t("hehv_min_top_p"), P0 - t("hehv_attn_ent_coef") * aE)
    # adaptive
    LU, AU = ent + vent, aE + aV
    T_ada = T0 * (1 + t("ada_temp_logits") * LU + t("ada_temp_attn") * AU - t("ada_temp_agree") * agr)
    P_ada = torch.clamp(P0 * (1 + t("ada_top_p") * aV), min=0.0)
    P_ada = torch.minimum(torch.maximum(P_ada, t("ada_top_p_min")), t("ada_top_p_max"))
    K_ada = torch.round(K0 * (1 + t("ada_top_k_int") * IS - t("ada_top_k_agree") * agr))
    K_ada = torch.minimum(torch.maximum(K_ada, t("ada_top_k_min")), t("ada_top_k_max"))
    M_ada = torch.minimum(torch.maximum(M0 * (1 - t("ada_min_p") * LU), t("ada_min_p_min")), t("ada_min_p_max"))

    def pick(per_branch):
        out = per_branch[ADAPTIVE]
        for b in (RESAMPLE, EXPLORE, INSERT_COT, ARGMAX):
            out = torch.where(code == b, per_branch[b], out)
        return out

    temperature = pick({ARGMAX: zeros, INSERT_COT: T_cot, EXPLORE: T_exp, RESAMPLE: T_res, ADAPTIVE: T_ada})
    top_k = pick({ARGMAX: ones, INSERT_COT: K0, EXPLORE: K_exp, RESAMPLE: K0, ADAPTIVE: K_ada})
    top_p = pick({ARGMAX: ones, INSERT_COT: P0, EXPLORE: P0, RESAMPLE: P_res, ADAPTIVE: P_ada})
    min_p = pick({ARGMAX: zeros, INSERT_COT: M0, EXPLORE: M0, RESAMPLE: M0, ADAPTIVE: M_ada})
    n = pick({ARGMAX: ones, INSERT_COT: ones, EXPLORE: ones, RESAMPLE: ones,
              ADAPTIVE: t("n_adaptive_samples")})
    return BranchParams(branch=code, temperature=temperature, top_k=top_k.long(), top_p=top_p,
                        min_p=min_p, n_draws=n.long())


# ----------------------------------------------------------------------------
# Section 4: one sampling step
# ----------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Temperature-scaled logits with every filtered-out token set to -inf.

    Order (SPEC section 4): divide by T; keep p >= min_p * p_max; keep the
    top_k most probable of those; keep the smallest most-probable prefix of the
    survivors (renormalised) whose cumulative probability reaches top_p, i.e.
    token i (descending order) stays when the mass before it is < top_p.
    Ties in probability are ordered by token id (lower first).
    ``temperature`` must be > 0 here (argmax rows are handled by the caller).
    """
    x = logits.to(dtype)
    B, V = x.shape
    neg = torch.full_like(x, -math.inf)
    x = torch.where(torch.isfinite(x), x, neg)
    s = x / temperature.to(dtype)[:, None]
    mx = s.max(-1, keepdim=True).values
    # min_p: p_i >= min_p * p_max  <=>  s_i - s_max >= log(min_p)
    mp = min_p.to(dtype)[:, None]
    keep = (s - mx) >= torch.log(mp.clamp_min(0))  # log(0) = -inf keeps all finite
    keep &= torch.isfinite(s)
    s = torch.where(keep, s, neg)
    # order: descending probability, ties by lower token id (stable sort)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ss = torch.gather(s, -1, order)
    rank = torch.arange(V, device=x.device)[None, :]
    keep_sorted = rank < top_k.to(torch.int64)[:, None]
    ss = torch.where(keep_sorted, ss, neg)
    p = torch.softmax(ss, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)
    before = torch.cumsum(p, -1) - p
    keep_sorted &= before < top_p.to(dtype)[:, None]
    ss = torch.where(keep_sorted, ss, neg)
    out = torch.full_like(s, -math.inf)
    out.scatter_(-1, order, ss)
    return out


def filtered_probs(logits, temperature, top_k, top_p, min_p, dtype=torch.float64):
    """The exact distribution a draw with these parameters follows."""
    f = filter_logits(logits, temperature, top_k, top_p, min_p, dtype)
    p = torch.softmax(f, -1)
    return torch.where(torch.isnan(p), torch.zeros_like(p), p)


def generator_noise(shape, generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """Exp(1) noise ``[B, ...]``; row b uses ``generators[b]`` when given."""
    q = torch.empty(shape, device=device, dtype=dtype).exponential_()
    if generators is not None:
        for b, g in enumerate(generators):
            if g is not None:
                q[b].exponential_(generator=g)
    return q


def race(filtered: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: ``argmax_i filtered_i - log(noise_i)`` over kept tokens.

    With ``noise ~ Exp(1)`` i.i.d. this draws from ``softmax(filtered)``.
    """
    score = filtered.to(noise.dtype) - torch.log(noise)
    score = torch.where(torch.isfinite(filtered), score, torch.full_like(score, -math.inf))
    return torch.argmax(score, dim=-1)


def sample_step(logits: torch.Tensor, params: BranchParams, noise: torch.Tensor,
                cot_token: Optional[torch.Tensor] = None,
                prev_is_cot: Optional[torch.Tensor] = None,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One Entropix token per row.

    logits:      ``[B, V]`` (masks applied, -inf = forbidden).
    params:      from :func:`branch_params`.
    noise:       ``[B, N, V]`` Exp(1) noise, ``N >= max(n_draws)``; draw j of
                 row b uses ``noise[b, j]`` (indexed by token id).
    cot_token:   ``[B]`` int64 CoT token per row (insert branch).
    prev_is_cot: ``[B]`` bool, the row's previous generated token was the CoT
                 token.
    Insert rows emit the CoT token unless ``prev_is_cot`` or its logit is -inf,
    in which case they sample with the branch's fallback parameters. Adaptive
    rows draw ``n_draws`` tokens and keep the one with the highest raw logit
    (ties: the first drawn). A sampling branch whose temperature comes out
    ``<= 0`` (possible only with zero offsets in the configuration) takes the
    argmax, the T -> 0 limit of the draw.
    """
    B, V = logits.shape
    x = logits.to(dtype)
    stats = logit_stats(logits, dtype)
    safe_t = torch.where(params.temperature > 0, params.temperature.to(dtype), torch.ones_like(x[:, 0]))
    f = filter_logits(x, safe_t, params.top_k, params.top_p, params.min_p, dtype)
    N = int(params.n_draws.max().item()) if B else 1
    best_tok = race(f, noise[:, 0])
    best_val = torch.gather(x, 1, best_tok[:, None])[:, 0]
    for j in range(1, N):
        tok = race(f, noise[:, j])
        val = torch.gather(x, 1, tok[:, None])[:, 0]
        better = (j < params.n_draws) & (val > best_val)
        best_tok = torch.where(better, tok, best_tok)
        best_val = torch.where(better, val, best_val)
    greedy = (params.branch == ARGMAX) | ~(params.temperature > 0)
    out = torch.where(greedy, stats.argmax, best_tok)
    if cot_token is not None:
        cot = cot_token.to(torch.int64)
        cot_ok = (cot >= 0) & (cot < V)
        cot_logit = torch.gather(x, 1, cot.clamp(0, V - 1)[:, None])[:, 0]
        allowed = cot_ok & torch.isfinite(cot_logit)
        if prev_is_cot is None:
            prev_is_cot = torch.zeros(B, dtype=torch.bool, device=x.device)
        emit = (params.branch == INSERT_COT) & allowed & ~prev_is_cot
        out = torch.where(emit, cot, out)
    return out
