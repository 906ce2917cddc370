"""Filtered sampling from the top-K candidates of each row (Triton).

:func:`sample_candidates` implements ``entropix_vllm.ops.sample_candidates``
(SPEC section 4 on the candidates), bit-for-bit in its decisions with
``entropix_vllm.torch_ops.sample_candidates``: one program per row over the row's ``K``
candidates, computing in float64 like the reference:

1. ``s = v / T`` (non-finite candidate values count as ``-inf``);
2. min_p: keep ``s - max(s) >= log(min_p)`` (``min_p = 0`` keeps every finite);
3. rank the survivors by ``s`` descending, ties by lower candidate index (the
   reference's stable sort), computed with a ``[K, K]`` comparison so the
   candidates need not arrive sorted; keep ``rank < top_k``;
4. top_p: softmax over those, keep the ones whose probability mass ranked
   before them is ``< top_p``;
5. for each draw ``j < n_draws``: the exponential race
   ``argmax(s - log(noise[b, j]))`` over the kept candidates (lowest index on
   ties); the row returns the drawn candidate with the highest raw value
   ``v`` (the first drawn on ties), as its token id ``cand_ids[b, c]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def sample_row(cv_row, ci_row, q_row, s_qj, K, N, temp, topk, top_p, mp, n,
               KP: tl.constexpr):
    """The token one row draws (steps 1-5 of the module docstring).

    ``cv_row``/``ci_row``/``q_row`` point at the row's candidates, ids and
    first draw of noise (draw j at ``q_row + j * s_qj``); ``temp``, ``top_p``,
    ``mp`` are float64 scalars, ``topk`` and ``n`` int32 scalars. Returns the
    token id (as loaded from ``ci_row``).
    """
    NEG_INF = float("-inf")
    c = tl.arange(0, KP)
    ok = c < K
    v = tl.load(cv_row + c, mask=ok, other=NEG_INF).to(tl.float64)
    finite = (v == v) & (tl.abs(v) != float("inf"))
    s = tl.where(finite, v, NEG_INF) / temp

    # min_p relative to the best candidate
    mx = tl.max(s, axis=0)
    log_mp = tl.log(tl.where(mp > 0.0, mp, 1.0))
    log_mp = tl.where(mp > 0.0, log_mp, NEG_INF)
    keep = ((s - mx) >= log_mp) & (s > NEG_INF)
    s = tl.where(keep, s, NEG_INF)

    # rank: descending s, ties by lower index (stable sort order)
    sj = s[None, :]
    si = s[:, None]
    ahead = (sj > si) | ((sj == si) & (c[None, :] < c[:, None]))
    rank = tl.sum(ahead.to(tl.int32), axis=1)

    # top_k
    keep_k = rank < topk
    ss = tl.where(keep_k, s, NEG_INF)

    # top_p on the renormalised survivors
    m2 = tl.max(ss, axis=0)
    ex = tl.where(ss > NEG_INF, tl.exp(ss - tl.where(m2 > NEG_INF, m2, 0.0)), 0.0)
    z = tl.sum(ex, axis=0)
    prob = ex / tl.where(z > 0.0, z, 1.0)
    upto = tl.sum(tl.where(rank[None, :] <= rank[:, None], prob[None, :], 0.0), axis=1)
    before = upto - prob
    kept = keep_k & (before < top_p) & (ss > NEG_INF)
    f = tl.where(kept, ss, NEG_INF)

    # exponential race, best raw value over the row's draws
    q = tl.load(q_row + c, mask=ok, other=1.0).to(tl.float64)
    score = tl.where(kept, f - tl.log(q), NEG_INF)
    best_c = tl.argmax(score, axis=0, tie_break_left=True)
    best_v = tl.sum(tl.where(c == best_c, v, 0.0), axis=0)
    for j in range(1, N):
        q = tl.load(q_row + j * s_qj + c, mask=ok, other=1.0).to(tl.float64)
        score = tl.where(kept, f - tl.log(q), NEG_INF)
        cj = tl.argmax(score, axis=0, tie_break_left=True)
        vj = tl.sum(tl.where(c == cj, v, 0.0), axis=0)
        better = (j < n) & (vj > best_v)
        best_c = tl.where(better, cj, best_c)
        best_v = tl.where(better, vj, best_v)
    return tl.load(ci_row + best_c)


#: The per-step ints of the draw kernels (the noise depth N and the noise's row
#: stride N * K): never specialised (``launch.py``, rule 1).
NOISE_DEPTH_ARGS = ["N", "s_qb"]
#: The per-row parameter and result pointers the draw kernels read or write
#: one scalar of per row: their alignment is not specialised (rule 2).
SAMPLE_ROW_POINTERS = ["t_ptr", "k_ptr", "p_ptr", "mp_ptr", "n_ptr", "out_ptr"]


@triton.jit(do_not_specialize=NOISE_DEPTH_ARGS,
            do_not_specialize_on_alignment=SAMPLE_ROW_POINTERS)
def _sample_kernel(cv_ptr, ci_ptr, t_ptr, k_ptr, p_ptr, mp_ptr, n_ptr, q_ptr, out_ptr,
                   K, N, s_cv, s_ci, s_qb, s_qj,
                   KP: tl.constexpr):
    row = tl.program_id(0)
    r64 = row.to(tl.int64)
    tok = sample_row(cv_ptr + r64 * s_cv, ci_ptr + r64 * s_ci, q_ptr + r64 * s_qb, s_qj, K, N,
                     tl.load(t_ptr + row).to(tl.float64), tl.load(k_ptr + row).to(tl.int32),
                     tl.load(p_ptr + row).to(tl.float64), tl.load(mp_ptr + row).to(tl.float64),
                     tl.load(n_ptr + row).to(tl.int32), KP)
    tl.store(out_ptr + row, tok.to(tl.int64))


def sample_candidates(cand_vals: torch.Tensor, cand_ids: torch.Tensor,
                      temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor, n_draws: torch.Tensor, noise: torch.Tensor
                      ) -> torch.Tensor:
    """One token per row drawn from its candidates (``ops.sample_candidates``).

    cand_vals ``[B, K]`` float (descending as produced by the logit kernel,
    though any order gives the reference's result), cand_ids ``[B, K]`` int;
    per-row ``temperature [B]`` (> 0), ``top_k [B]`` int (1..K), ``top_p [B]``
    in (0, 1], ``min_p [B]`` in [0, 1), ``n_draws [B]`` int (1..N); ``noise
    [B, N, K]`` Exp(1) noise, draw j of row b racing with ``noise[b, j, c]``.
    Returns int64 ``[B]`` token ids. No host synchronisation.
    """
    if cand_vals.dim() != 2 or cand_ids.shape != cand_vals.shape:
        raise ValueError(f"cand_vals/cand_ids: expected matching [B, K], got "
                         f"{tuple(cand_vals.shape)} and {tuple(cand_ids.shape)}")
    B, K = cand_vals.shape
    if noise.dim() != 3 or noise.shape[0] != B or noise.shape[2] != K or noise.shape[1] < 1:
        raise ValueError(f"noise: expected [B, N>=1, K] = [{B}, N, {K}], got {tuple(noise.shape)}")
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("min_p", min_p), ("n_draws", n_draws)):
        if t.shape != (B,):
            raise ValueError(f"{name}: expected shape [{B}], got {tuple(t.shape)}")
    out = torch.empty(B, device=cand_vals.device, dtype=torch.int64)
    if B == 0 or K == 0:
        return out.zero_()
    cv = cand_vals if cand_vals.stride(1) == 1 else cand_vals.contiguous()
    ci = cand_ids if cand_ids.stride(1) == 1 else cand_ids.contiguous()
    q = noise if noise.stride(2) == 1 else noise.contiguous()
    temperature, top_k, top_p, min_p, n_draws = (
        t.contiguous() for t in (temperature, top_k, top_p, min_p, n_draws))
    KP = max(16, triton.next_power_of_2(K))
    _sample_kernel[(B,)](cv, ci, temperature, top_k, top_p, min_p, n_draws, q, out,
                         K, q.shape[1], cv.stride(0), ci.stride(0), q.stride(0), q.stride(1),
                         KP=KP, num_warps=4 if KP <= 64 else 8)
    return out
