"""The Entropix decision and draw of a whole batch in one launch (Triton).

:func:`decide_and_sample` implements ``entropix_vllm.ops.decide_and_sample``
for CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``): one program per
row does, in float64 like ``reference.branch_params``,

1. the branch of SPEC section 3 from the row's entropy and varentropy (first
   matching rule wins) and the parameters (T, top_k, top_p, min_p, n_draws)
   of every branch from the attention figures and the row's coefficients,
   picked by the branch (argmax rows: T 0, top_k 1, top_p 1, min_p 0, one
   draw);
2. the draw among the row's candidates (``candidate_sampling.sample_row``:
   min_p, top_k, top_p, the exponential race over ``n_draws`` draws) with
   those parameters, clamped to the ranges of ``contract.py``;
3. the token: the argmax for argmax rows, rows with non-finite figures and
   rows whose temperature is not positive; the CoT token for insert rows
   unless the previous generated token was already it, it is out of range or
   its logit is ``-inf``/NaN (masked); the draw otherwise.

Replaces the ~180 small tensor ops of the same steps (the ``"torch"`` backend,
``torch_ops.decide_and_sample``; each a kernel launch on a GPU) with one launch; its
results equal those of the tensor-op path (the parameters to the last bit:
the same float64 operations in the same order, no FMA contraction). The CPU
twin is the C++ op ``entropix::decide_and_sample`` (``csrc/decide.cpp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropix_vllm import contract

from .candidate_sampling import NOISE_DEPTH_ARGS, sample_row

# branch codes (contract.ARGMAX ... contract.ADAPTIVE)
ARGMAX = tl.constexpr(contract.ARGMAX)
INSERT_COT = tl.constexpr(contract.INSERT_COT)
EXPLORE = tl.constexpr(contract.EXPLORE)
RESAMPLE = tl.constexpr(contract.RESAMPLE)
ADAPTIVE = tl.constexpr(contract.ADAPTIVE)
# clamps of the drawn parameters (contract.py)
TOP_P_MIN = tl.constexpr(contract.TOP_P_MIN)
TOP_P_MAX = tl.constexpr(contract.TOP_P_MAX)
MIN_P_MIN = tl.constexpr(contract.MIN_P_MIN)
MIN_P_MAX = tl.constexpr(contract.MIN_P_MAX)
# the kernel's launch constant of each coefficient column it reads:
# "I_" + the column's short name (contract.DECIDE_COLUMNS order)
_COLUMN_CONSTANTS = tuple(f"I_{short}" for short, _ in contract.DECIDE_COLUMNS)


@triton.jit
def _max(a, b):
    """``torch.maximum`` (NaN propagates)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min(a, b):
    """``torch.minimum`` (NaN propagates)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_half_even(x):
    """``torch.round`` (ties to even) of a float64 scalar."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


#: Pointers the decision reads or writes only scalars through (figures,
#: coefficients, argmax, CoT settings and logit, results): their alignment is
#: not specialised (``launch.py``, rule 2); the noise depth as in
#: ``candidate_sampling``.
_ROW_POINTERS = ["ent_ptr", "vent_ptr", "ae_ptr", "av_ptr", "agr_ptr", "is_ptr", "coef_ptr",
                 "arg_ptr", "cot_ptr", "prev_ptr", "logits_ptr", "tok_ptr", "br_ptr", "t_ptr",
                 "k_ptr", "p_ptr", "mp_ptr", "n_ptr"]


@triton.jit(do_not_specialize=NOISE_DEPTH_ARGS, do_not_specialize_on_alignment=_ROW_POINTERS)
def _decide_kernel(
    ent_ptr, vent_ptr, ae_ptr, av_ptr, agr_ptr, is_ptr,
    coef_ptr, s_coef, cv_ptr, ci_ptr, s_cv, s_ci, K, q_ptr, s_qb, s_qj, N,
    arg_ptr, cot_ptr, prev_ptr, logits_ptr, s_lb, V,
    tok_ptr, br_ptr, t_ptr, k_ptr, p_ptr, mp_ptr, n_ptr,
    I_T0: tl.constexpr, I_P0: tl.constexpr, I_K0: tl.constexpr, I_M0: tl.constexpr,
    I_LE: tl.constexpr, I_ME: tl.constexpr, I_HE: tl.constexpr, I_LV: tl.constexpr,
    I_HV: tl.constexpr,
    I_HELV_OFF: tl.constexpr, I_HELV_COEF: tl.constexpr, I_HELV_MAX: tl.constexpr,
    I_LEHV_OFF: tl.constexpr, I_LEHV_COEF: tl.constexpr, I_LEHV_MAX: tl.constexpr,
    I_LEHV_MINK: tl.constexpr, I_LEHV_AGREE: tl.constexpr,
    I_HEHV_OFF: tl.constexpr, I_HEHV_COEF: tl.constexpr, I_HEHV_MIN: tl.constexpr,
    I_HEHV_ENT: tl.constexpr, I_HEHV_MINP: tl.constexpr,
    I_NADA: tl.constexpr, I_A_TL: tl.constexpr, I_A_TA: tl.constexpr, I_A_TG: tl.constexpr,
    I_A_P: tl.constexpr, I_A_PMIN: tl.constexpr, I_A_PMAX: tl.constexpr,
    I_A_KI: tl.constexpr, I_A_KG: tl.constexpr, I_A_KMIN: tl.constexpr, I_A_KMAX: tl.constexpr,
    I_A_M: tl.constexpr, I_A_MMIN: tl.constexpr, I_A_MMAX: tl.constexpr,
    HAS_ATTN: tl.constexpr, K_CLAMP: tl.constexpr, KP: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = row.to(tl.int64)
    ent = tl.load(ent_ptr + row).to(tl.float64)
    vent = tl.load(vent_ptr + row).to(tl.float64)
    if HAS_ATTN:
        aE = tl.load(ae_ptr + row).to(tl.float64)
        aV = tl.load(av_ptr + row).to(tl.float64)
        agr = tl.load(agr_ptr + row).to(tl.float64)
        IS = tl.load(is_ptr + row).to(tl.float64)
    else:  # no figures: zeros (AttnStats.zeros)
        aE = tl.where(ent == ent, 0.0, 0.0).to(tl.float64)
        aV = aE
        agr = aE
        IS = aE
    cr = coef_ptr + r64 * s_coef
    T0 = tl.load(cr + I_T0)
    P0 = tl.load(cr + I_P0)
    K0 = tl.load(cr + I_K0)
    M0 = tl.load(cr + I_M0)

    # 1. the branch: the first matching rule wins (later ones are overridden)
    le, me, he = tl.load(cr + I_LE), tl.load(cr + I_ME), tl.load(cr + I_HE)
    lv, hv = tl.load(cr + I_LV), tl.load(cr + I_HV)
    code = tl.where((ent > me) & (vent > hv), RESAMPLE, ADAPTIVE)
    code = tl.where((ent < he) & (vent > hv), EXPLORE, code)
    code = tl.where((ent > he) & (vent < lv), INSERT_COT, code)
    code = tl.where((ent < le) & (vent < lv), ARGMAX, code)

    # the parameters of every branch (reference.branch_params, same operation order)
    T_cot = _min(tl.load(cr + I_HELV_MAX),
                 T0 * (tl.load(cr + I_HELV_OFF) + tl.load(cr + I_HELV_COEF) * aE))
    T_exp = _min(tl.load(cr + I_LEHV_MAX),
                 T0 * (tl.load(cr + I_LEHV_OFF) + tl.load(cr + I_LEHV_COEF) * IS))
    K_exp = _max(tl.load(cr + I_LEHV_MINK),
                 tl.floor(K0 * (1 + tl.load(cr + I_LEHV_AGREE) * (1 - agr))))
    T_res = _max(tl.load(cr + I_HEHV_MIN),
                 T0 * (tl.load(cr + I_HEHV_OFF) + tl.load(cr + I_HEHV_COEF) * aV))
    P_res = _max(tl.load(cr + I_HEHV_MINP), P0 - tl.load(cr + I_HEHV_ENT) * aE)
    LU = ent + vent
    AU = aE + aV
    T_ada = T0 * (1 + tl.load(cr + I_A_TL) * LU + tl.load(cr + I_A_TA) * AU
                  - tl.load(cr + I_A_TG) * agr)
    P_ada = _max(P0 * (1 + tl.load(cr + I_A_P) * aV), 0.0)
    P_ada = _min(_max(P_ada, tl.load(cr + I_A_PMIN)), tl.load(cr + I_A_PMAX))
    K_ada = _round_half_even(K0 * (1 + tl.load(cr + I_A_KI) * IS - tl.load(cr + I_A_KG) * agr))
    K_ada = _min(_max(K_ada, tl.load(cr + I_A_KMIN)), tl.load(cr + I_A_KMAX))
    M_ada = _min(_max(M0 * (1 - tl.load(cr + I_A_M) * LU), tl.load(cr + I_A_MMIN)),
                 tl.load(cr + I_A_MMAX))
    n_ada = tl.load(cr + I_NADA)

    is_arg = code == ARGMAX
    is_cot = code == INSERT_COT
    is_exp = code == EXPLORE
    is_res = code == RESAMPLE
    temp = tl.where(is_arg, 0.0, tl.where(is_cot, T_cot, tl.where(
        is_exp, T_exp, tl.where(is_res, T_res, T_ada))))
    topk = tl.where(is_arg, 1.0, tl.where(is_cot, K0, tl.where(
        is_exp, K_exp, tl.where(is_res, K0, K_ada))))
    topp = tl.where(is_arg, 1.0, tl.where(is_cot | is_exp, P0, tl.where(is_res, P_res, P_ada)))
    minp = tl.where(is_arg, 0.0, tl.where(is_cot | is_exp | is_res, M0, M_ada))
    ndraw = tl.where(code == ADAPTIVE, n_ada, 1.0)

    # 2. the draw, with the parameters as the step passes them: float32
    # temperature/top_p/min_p, clamped in float32, integers clamped
    t32 = temp.to(tl.float32)
    p32 = topp.to(tl.float32)
    m32 = minp.to(tl.float32)
    sane = (ent == ent) & (tl.abs(ent) != float("inf")) & (vent == vent) \
        & (tl.abs(vent) != float("inf"))
    draw_ok = sane & (code != ARGMAX) & (t32 > 0.0)
    k_i = topk.to(tl.int64)
    k_i = tl.minimum(tl.maximum(k_i, 1), K_CLAMP).to(tl.int32)
    n_i = ndraw.to(tl.int64)
    n_i = tl.minimum(tl.maximum(n_i, 1), N).to(tl.int32)
    one = tl.full([], 1.0, tl.float32)
    t_use = tl.where(draw_ok, t32, one)
    p_use = tl.where(draw_ok, tl.minimum(tl.maximum(p32, TOP_P_MIN), TOP_P_MAX), one)
    m_use = tl.where(draw_ok, tl.minimum(tl.maximum(m32, MIN_P_MIN), MIN_P_MAX), one * 0.0)
    drawn = sample_row(cv_ptr + r64 * s_cv, ci_ptr + r64 * s_ci, q_ptr + r64 * s_qb, s_qj, K, N,
                       t_use.to(tl.float64), k_i, p_use.to(tl.float64), m_use.to(tl.float64),
                       n_i, KP).to(tl.int64)
    tok = tl.where(draw_ok, drawn, tl.load(arg_ptr + row).to(tl.int64))

    # 3. the CoT token
    cot = tl.load(cot_ptr + row).to(tl.int64)
    in_range = (cot >= 0) & (cot < V)
    cl = tl.load(logits_ptr + r64 * s_lb + tl.minimum(tl.maximum(cot, 0), V - 1)).to(tl.float32)
    cot_ok = (cl == cl) & (tl.abs(cl) != float("inf"))
    prev = tl.load(prev_ptr + row).to(tl.int32)
    emit = is_cot & sane & in_range & cot_ok & (prev == 0)
    tok = tl.where(emit, cot, tok)

    tl.store(tok_ptr + row, tok)
    tl.store(br_ptr + row, code.to(tl.int64))
    tl.store(t_ptr + row, t32)
    tl.store(k_ptr + row, topk.to(tl.int64))
    tl.store(p_ptr + row, p32)
    tl.store(mp_ptr + row, m32)
    tl.store(n_ptr + row, ndraw.to(tl.int64))


def decide_and_sample(entropy, varentropy, attn, coeff_table, columns, cand_vals, cand_ids,
                      noise, argmax, cot_token, prev_is_cot, logits):
    """See ``entropix_vllm.ops.decide_and_sample``; ``columns``: the table's
    column of each entry of ``contract.DECIDE_COLUMNS``. Returns ``(tokens,
    contract.BranchParams)``."""
    B = entropy.shape[0]
    dev = entropy.device
    ibuf = torch.empty(4, B, device=dev, dtype=torch.int64)
    fbuf = torch.empty(3, B, device=dev, dtype=torch.float32)
    tokens, branch, top_k, n_draws = ibuf.unbind(0)
    temperature, top_p, min_p = fbuf.unbind(0)
    out = (tokens, contract.BranchParams(branch=branch, temperature=temperature, top_k=top_k,
                                         top_p=top_p, min_p=min_p, n_draws=n_draws))
    if B == 0:
        return out
    if len(columns) != len(_COLUMN_CONSTANTS):
        raise ValueError(f"columns: expected {len(_COLUMN_CONSTANTS)} column indices, got "
                         f"{len(columns)}")
    idx = dict(zip(_COLUMN_CONSTANTS, (int(c) for c in columns)))
    table = coeff_table if coeff_table.stride(1) == 1 else coeff_table.contiguous()
    cv = cand_vals if cand_vals.stride(1) == 1 else cand_vals.contiguous()
    ci = cand_ids if cand_ids.stride(1) == 1 else cand_ids.contiguous()
    q = noise if noise.stride(2) == 1 else noise.contiguous()
    lg = logits if logits.stride(1) == 1 else logits.contiguous()
    K = cv.shape[1]
    if attn is not None:
        a = (attn.attn_entropy, attn.attn_varentropy, attn.agreement, attn.interaction_strength)
        a = tuple(t.contiguous() for t in a)
    else:
        a = (entropy,) * 4
    KP = max(16, triton.next_power_of_2(K))
    _decide_kernel[(B,)](
        entropy.contiguous(), varentropy.contiguous(), *a,
        table, table.stride(0), cv, ci, cv.stride(0), ci.stride(0), K,
        q, q.stride(0), q.stride(1), q.shape[1],
        argmax.contiguous(), cot_token.contiguous(), prev_is_cot.contiguous().view(torch.uint8),
        lg, lg.stride(0),
        lg.shape[1],
        tokens, branch, temperature, top_k, top_p, min_p, n_draws,
        HAS_ATTN=attn is not None, K_CLAMP=contract.K_MAX, KP=KP,
        num_warps=4 if KP <= 64 else 8, enable_fp_fusion=False, **idx)
    return out
