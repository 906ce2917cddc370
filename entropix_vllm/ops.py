"""The only door to the kernels: dispatch by device and backend.

Backends:

* ``"triton"``: the fused Triton kernels in ``triton_kernels/`` (CUDA tensors;
  CPU tensors too when ``TRITON_INTERPRET=1`` is set before triton is imported).
* ``"cpp"``: the C++ ops built from ``csrc/`` (``torch.ops.entropix.*``), CPU.
* ``"torch"``: the reference implementation (``entropix_vllm.reference``).
* ``"auto"``: Triton on CUDA tensors, C++ on CPU tensors, the reference when the
  chosen backend is not available.

Every entry point has the same semantics on every backend; the tests compare
each backend with the float64 reference.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import reference
from .config import K_MAX, EntropixConfig
from .reference import AttnStats, LogitStats

COEFF_NAMES = EntropixConfig.field_names()  # the columns of a coefficient table

BACKENDS = ("auto", "triton", "cpp", "torch")


@functools.lru_cache(maxsize=None)
def cpp_available() -> bool:
    """True when the ``csrc/`` extension is built and loadable."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.entropix)
    except Exception:
        return False
    return hasattr(torch.ops, "entropix") and hasattr(torch.ops.entropix, "logit_stats")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        import entropix_vllm.triton_kernels  # noqa: F401
    except Exception:
        return False
    return True


def _resolve(backend: str, t: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "cpp" and not cpp_available():
            raise RuntimeError("backend 'cpp' requested but the entropix C++ extension is not built "
                               "(pip install -e . builds it)")
        if backend == "triton" and not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not importable")
        return backend
    if t.is_cuda and triton_available():
        return "triton"
    if t.device.type == "cpu" and cpp_available():
        return "cpp"
    return "torch"


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a [B, V] tensor, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits: expected float32, float16 or bfloat16, got {logits.dtype}")


def logit_stats_and_candidates(logits: torch.Tensor, num_candidates: int = K_MAX,
                               backend: str = "auto"
                               ) -> Tuple[LogitStats, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One read of ``logits [B, V]`` (fp32/bf16/fp16, any V >= 1, -inf allowed).

    Returns ``(stats, cand_vals, cand_ids)``:

    * ``stats``: :class:`LogitStats` with float32 ``max``, ``logsumexp``,
      ``entropy`` (bits), ``varentropy`` (bits^2) and int64 ``argmax``, each
      ``[B]``. All -inf row: max = logsumexp = -inf, entropy = varentropy = 0,
      argmax 0. A row holding NaN or +inf: NaN statistics and argmax 0.
    * ``cand_vals [B, num_candidates]`` float32, the largest logits of each row
      in descending order (``-inf`` padding when the row has fewer finite
      entries), and ``cand_ids [B, num_candidates]`` int64 their token ids.
      ``None`` for both when ``num_candidates == 0``.
    """
    _check_logits(logits)
    if not 0 <= num_candidates <= K_MAX:
        raise ValueError(f"num_candidates: expected 0..{K_MAX}, got {num_candidates}")
    be = _resolve(backend, logits)
    if be == "triton":
        from entropix_vllm.triton_kernels.logit_stats import fused_logit_stats
        return fused_logit_stats(logits, num_candidates)
    if be == "cpp":
        out = torch.ops.entropix.logit_stats(logits.contiguous(), num_candidates)
        mx, am, lse, ent, vent, cv, ci = out
        stats = LogitStats(mx, am, lse, ent, vent)
        return (stats, cv, ci) if num_candidates else (stats, None, None)
    s = reference.logit_stats(logits, torch.float64)
    stats = LogitStats(s.max.float(), s.argmax, s.logsumexp.float(), s.entropy.float(),
                       s.varentropy.float())
    if num_candidates == 0:
        return stats, None, None
    cv, ci = reference.topk_candidates(logits, num_candidates)
    return stats, cv, ci


def logit_stats(logits: torch.Tensor, backend: str = "auto") -> LogitStats:
    """Per-row max, argmax, logsumexp, entropy and varentropy (see above)."""
    return logit_stats_and_candidates(logits, 0, backend)[0]


def sample_candidates(cand_vals: torch.Tensor, cand_ids: torch.Tensor,
                      temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor, n_draws: torch.Tensor, noise: torch.Tensor,
                      backend: str = "auto") -> torch.Tensor:
    """Draw one token per row from its candidates (SPEC section 4).

    cand_vals ``[B, K]`` float32 descending, cand_ids ``[B, K]`` int64 (from
    :func:`logit_stats_and_candidates`); per-row ``temperature [B]`` (> 0),
    ``top_k [B]`` int (1..K), ``top_p [B]`` in (0, 1], ``min_p [B]`` in [0, 1),
    ``n_draws [B]`` int (1..N); ``noise [B, N, K]`` float32 Exp(1) noise,
    draw j of row b racing with ``noise[b, j, c]`` for candidate c.

    Filters as :func:`reference.filter_logits` (min_p, then top_k, then top_p
    on the renormalised survivors), draws each of the row's ``n_draws`` with the
    exponential race and returns the drawn token with the highest raw logit
    (ties: the first drawn), as int64 ``[B]``.
    """
    be = _resolve(backend, cand_vals)
    if be == "triton":
        from entropix_vllm.triton_kernels.candidate_sampling import sample_candidates as _tk
        return _tk(cand_vals, cand_ids, temperature, top_k, top_p, min_p, n_draws, noise)
    if be == "cpp":
        return torch.ops.entropix.sample_candidates(
            cand_vals.contiguous(), cand_ids.contiguous(), temperature.float().contiguous(),
            top_k.long().contiguous(), top_p.float().contiguous(), min_p.float().contiguous(),
            n_draws.long().contiguous(), noise.float().contiguous())
    return reference_sample_candidates(cand_vals, cand_ids, temperature, top_k, top_p, min_p,
                                       n_draws, noise)


def reference_sample_candidates(cand_vals, cand_ids, temperature, top_k, top_p, min_p, n_draws,
                                noise) -> torch.Tensor:
    """The torch path of :func:`sample_candidates`, built on the reference."""
    B, K = cand_vals.shape
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


def decide_and_sample(entropy: torch.Tensor, varentropy: torch.Tensor,
                      attn: Optional[AttnStats], coeff_table: torch.Tensor,
                      cand_vals: torch.Tensor, cand_ids: torch.Tensor, noise: torch.Tensor,
                      argmax: torch.Tensor, cot_token: torch.Tensor, prev_is_cot: torch.Tensor,
                      logits: torch.Tensor, backend: str = "auto"
                      ) -> Tuple[torch.Tensor, reference.BranchParams]:
    """The Entropix decision and the token of every row (SPEC sections 3 and 4).

    entropy/varentropy ``[B]`` float32 (bits, bits^2; from
    :func:`logit_stats_and_candidates`); ``attn``: the rows' figures or None
    (zeros); ``coeff_table [B, len(EntropixConfig.field_names())]`` float64,
    columns in that order; cand_vals/cand_ids ``[B, K]`` (K <= ``K_MAX``);
    ``noise [B, N, K]`` Exp(1) float32; ``argmax [B]`` int64; ``cot_token [B]``
    int64 (-1: none); ``prev_is_cot [B]`` bool; ``logits [B, V]`` (for the CoT
    token's mask: ``-inf`` forbids it).

    Per row: the branch and its parameters (``reference.branch_params``, in
    float64); a draw among the candidates with them
    (:func:`sample_candidates`, temperature/top_p/min_p in float32, top_k
    clamped to 1..K_MAX, n_draws to 1..N); the token: the argmax for argmax
    rows, rows whose entropy or varentropy is not finite and rows whose
    temperature is not positive; the CoT token for insert rows unless the
    previous generated token was already it, it is out of ``0..V-1`` or its
    logit is not finite; the draw otherwise. Returns ``(tokens [B] int64,
    BranchParams)`` with float32 temperature/top_p/min_p and int64 branch,
    top_k, n_draws (for rows with non-finite figures the integer parameters
    are unspecified). ``"triton"`` does all of it in one launch; the other
    backends: ``"cpp"`` one C++ op (``csrc/decide.cpp``), ``"torch"`` tensor
    ops on the reference (their draw on the reference's
    :func:`sample_candidates`).
    """
    be = _resolve(backend, entropy)
    if be == "triton":
        from entropix_vllm.triton_kernels.entropix_decide import decide_and_sample as _tk
        tokens, branch, t, k, p, mp, n = _tk(entropy, varentropy, attn, coeff_table, COEFF_NAMES,
                                             cand_vals, cand_ids, noise, argmax, cot_token,
                                             prev_is_cot, logits, K_MAX)
        return tokens, reference.BranchParams(branch=branch, temperature=t, top_k=k, top_p=p,
                                              min_p=mp, n_draws=n)
    if be == "cpp" and hasattr(torch.ops.entropix, "decide_and_sample"):
        a = ((attn.attn_entropy, attn.attn_varentropy, attn.agreement, attn.interaction_strength)
             if attn is not None else (None,) * 4)
        tokens, branch, t, k, p, mp, n = torch.ops.entropix.decide_and_sample(
            entropy, varentropy, *a, coeff_table, _coeff_columns(), cand_vals, cand_ids, noise,
            argmax, cot_token, prev_is_cot, logits, K_MAX)
        return tokens, reference.BranchParams(branch=branch, temperature=t, top_k=k, top_p=p,
                                              min_p=mp, n_draws=n)
    return _decide_and_sample_tensor_ops(entropy, varentropy, attn, coeff_table, cand_vals,
                                         cand_ids, noise, argmax, cot_token, prev_is_cot, logits,
                                         "cpp" if be == "cpp" else "torch")


@functools.lru_cache(maxsize=None)
def _coeff_columns() -> list:
    """Indices in COEFF_NAMES of the columns the fused decision ops read."""
    from entropix_vllm.triton_kernels.entropix_decide import COEFF_COLUMNS
    return [COEFF_NAMES.index(n) for n in COEFF_COLUMNS]


def _decide_and_sample_tensor_ops(entropy, varentropy, attn, coeff_table, cand_vals, cand_ids,
                                  noise, argmax, cot_token, prev_is_cot, logits, be):
    """:func:`decide_and_sample` as tensor ops (what the fused kernels equal)."""
    B, V = logits.shape
    coeffs = {n: coeff_table[:, i] for i, n in enumerate(COEFF_NAMES)}
    if attn is None:
        attn = AttnStats.zeros(B, device=entropy.device)
    p64 = reference.branch_params(entropy, varentropy, attn, coeffs, dtype=torch.float64)
    params = reference.BranchParams(
        branch=p64.branch, temperature=p64.temperature.float(), top_k=p64.top_k,
        top_p=p64.top_p.float(), min_p=p64.min_p.float(), n_draws=p64.n_draws)
    one = torch.ones_like(params.temperature)
    sane = torch.isfinite(entropy) & torch.isfinite(varentropy)
    draw_ok = sane & (params.branch != reference.ARGMAX) & (params.temperature > 0)
    drawn = sample_candidates(
        cand_vals, cand_ids,
        torch.where(draw_ok, params.temperature, one),
        params.top_k.clamp(1, K_MAX),
        torch.where(draw_ok, params.top_p.clamp(1e-6, 1.0), one),
        torch.where(draw_ok, params.min_p.clamp(0.0, 1.0 - 1e-6), torch.zeros_like(one)),
        params.n_draws.clamp(1, noise.shape[1]),
        noise, backend=be)
    tokens = torch.where(draw_ok, drawn, argmax)
    cot = cot_token.to(device=logits.device, dtype=torch.int64)
    cot_logit = torch.gather(logits, 1, cot.clamp(0, V - 1)[:, None])[:, 0]
    emit_cot = ((params.branch == reference.INSERT_COT) & sane & (cot >= 0) & (cot < V)
                & torch.isfinite(cot_logit) & ~prev_is_cot.to(logits.device))
    return torch.where(emit_cot, cot, tokens), params


def seeded_exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, num_draws: int,
                             num_candidates: int = K_MAX, backend: str = "auto") -> torch.Tensor:
    """Exp(1) noise ``[B, num_draws, num_candidates]`` float32, keyed by (seed, position).

    ``noise[b, j, c]`` depends only on ``seeds[b]`` (int64), ``positions[b]``
    (int) and ``(j, c)``: a row's noise is the same whatever else is in the
    batch (a murmur3 hash, see ``triton_kernels/seeded_noise.py``). ``backend``:
    ``"triton"`` (CUDA), ``"torch"`` or ``"auto"`` (Triton on CUDA tensors).
    """
    from .triton_kernels import seeded_noise

    if backend == "cpp":
        raise ValueError("backend: seeded noise has no C++ implementation; use 'torch' on CPU")
    be = backend
    if be == "auto":
        be = "triton" if seeds.is_cuda and triton_available() else "torch"
    return seeded_noise.exponential_noise(seeds, positions, num_draws, num_candidates, backend=be)


def paged_attention_stats(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float,
                          backend: str = "auto") -> AttnStats:
    """Attention figures (SPEC section 2) from a paged key cache.

    q ``[B, H, D]``: each sequence's query at the position being sampled.
    key_cache ``[num_blocks, block_size, H_kv, D]`` (any strides; fp32, fp16
    or bf16). block_table ``[B, max_blocks]`` int32/int64; seq_lens ``[B]``
    (L, the number of keys, current token included). Query head h reads kv
    head ``h // (H // H_kv)``. Returns float32 :class:`AttnStats`; a row with
    ``seq_len == 0`` gives zeros.
    """
    be = _resolve(backend, q)
    if be == "triton":
        from entropix_vllm.triton_kernels.attn_stats import paged_attention_stats as _tk
        return _tk(q, key_cache, block_table, seq_lens, scale)
    if be == "cpp" and hasattr(torch.ops.entropix, "paged_attention_stats"):
        out = torch.ops.entropix.paged_attention_stats(q, key_cache, block_table, seq_lens, float(scale))
        return AttnStats(*out)
    keys = [reference.gather_paged(key_cache, block_table[b], int(seq_lens[b]))
            for b in range(q.shape[0])]
    s = reference.attention_stats(q, keys, scale)
    return AttnStats(*(getattr(s, f).float() for f in
                       ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")))
