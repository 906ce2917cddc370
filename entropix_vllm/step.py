"""One Entropix sampling step on tensors, framework-neutral (DESIGN: step.py).

The vLLM adapters (``integration/mrv1.py``, ``integration/mrv2.py``) gather the
inputs from their runner and call :func:`entropix_step`; everything here is
tensor ops on the logits' device, with no host synchronisation and no Python
loop over rows:

1. :func:`entropix_vllm.ops.logit_stats_and_candidates`: one read of the logits
   gives max, argmax, logsumexp, entropy, varentropy and the top ``K_MAX``
   candidates of every row;
2. :func:`entropix_vllm.ops.decide_and_sample`: per row the branch and its
   (T, top_k, top_p, min_p, n_draws) as :func:`entropix_vllm.reference.branch_params`
   computes them (float64, so that the threshold comparisons are exactly
   those of SPEC section 3 on the float32 figures), the draw among the
   candidates (min_p, top_k, top_p, the exponential race over ``n_draws``
   draws, best by raw logit), then the token: argmax rows take the argmax;
   insert rows take the CoT token unless the row's previous generated token
   was already that token or the token is masked (its logit is ``-inf``), in
   which case they keep their draw. One Triton launch on CUDA
   (``triton_kernels/entropix_decide.py``), one C++ op on CPU
   (``csrc/decide.cpp``), tensor ops otherwise (``torch_ops.py``).

Rows whose logits hold NaN or ``+inf`` (an upstream fault) get the argmax
branch's result (token of the first maximal finite entry as the kernels define
it) instead of a draw with NaN parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import ops
from .config import COEFF_NAMES, EntropixConfig
from .contract import K_MAX, AttnStats, BranchParams, LogitStats


def coefficient_rows(configs: Sequence[EntropixConfig]) -> list:
    """Host-side rows ``[[value per name in COEFF_NAMES], ...]`` of the configs."""
    return [[float(getattr(c, n)) for n in COEFF_NAMES] for c in configs]


def coefficient_table(configs: Sequence[EntropixConfig], device=None) -> torch.Tensor:
    """The ``[B, len(COEFF_NAMES)]`` float64 coefficient table of the configs."""
    return torch.tensor(coefficient_rows(configs), dtype=torch.float64,
                        device=device).reshape(len(configs), len(COEFF_NAMES))


def coefficient_columns(table: torch.Tensor) -> dict:
    """``{name: table[:, i]}`` views of a coefficient table (the mapping form
    ``reference.branch_params`` takes)."""
    return {n: table[:, i] for i, n in enumerate(COEFF_NAMES)}


def max_draws(configs: Sequence[EntropixConfig]) -> int:
    """The noise depth a batch needs (host value, known without a sync)."""
    return max((c.n_adaptive_samples for c in configs), default=1)


@dataclass
class StepResult:
    """What one step decided, per row (all ``[B]``, on the logits' device)."""

    tokens: torch.Tensor        # int64
    stats: LogitStats
    attn: AttnStats
    params: BranchParams        # branch codes and the parameters used


def entropix_step(logits: torch.Tensor, attn: Optional[AttnStats],
                  coeff_table: torch.Tensor, cot_token: torch.Tensor,
                  prev_is_cot: torch.Tensor, noise: torch.Tensor,
                  backend: str = "auto") -> StepResult:
    """Entropix tokens for a batch of rows.

    logits:      ``[B, V]`` float32/bf16/fp16 at temperature 1, with every
                 mask, penalty and bias already applied (``-inf`` = forbidden).
    attn:        the rows' attention figures, or None (zeros: the figures of
                 SPEC section 2 are unavailable, e.g. the profiling run).
    coeff_table: ``[B, len(COEFF_NAMES)]`` float64, one row of coefficients per
                 row (:func:`coefficient_table`; columns in ``COEFF_NAMES`` order).
    cot_token:   ``[B]`` int64, the row's CoT token id (``-1``: none).
    prev_is_cot: ``[B]`` bool, the row's previous *generated* token is its CoT
                 token.
    noise:       ``[B, N, K_MAX]`` float32 Exp(1) noise, ``N >= n_draws`` of
                 every row; draw j of row b races candidate c with
                 ``noise[b, j, c]``. Seeded rows must take it from their seed.
    """
    B, V = logits.shape
    stats, cand_vals, cand_ids = ops.logit_stats_and_candidates(logits, K_MAX, backend=backend)
    tokens, params = ops.decide_and_sample(
        stats.entropy, stats.varentropy, attn, coeff_table,
        cand_vals, cand_ids, noise, stats.argmax, cot_token, prev_is_cot, logits,
        backend=backend)
    if attn is None:
        attn = AttnStats.zeros(B, device=logits.device)
    return StepResult(tokens=tokens, stats=stats, attn=attn, params=params)


def trace_tensors(result: StepResult, tokens: Optional[torch.Tensor] = None) -> dict:
    """The ``[B]`` tensors of one step that a trace record holds, by field name
    (``entropix_vllm.trace.TENSOR_FIELDS``); ``tokens`` defaults to the step's."""
    p = result.params
    return {"token_id": result.tokens if tokens is None else tokens,
            "entropy": result.stats.entropy, "varentropy": result.stats.varentropy,
            "attn_entropy": result.attn.attn_entropy,
            "attn_varentropy": result.attn.attn_varentropy,
            "agreement": result.attn.agreement,
            "interaction_strength": result.attn.interaction_strength,
            "branch": p.branch, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "min_p": p.min_p}
