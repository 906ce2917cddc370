"""The only door to the kernels: every op, and which backend runs it.

Backends, per op (:data:`IMPLEMENTATIONS`):

* ``"triton"``: the Triton kernels of ``triton_kernels/`` (CUDA tensors; CPU
  tensors too when ``TRITON_INTERPRET=1`` is set before triton is imported,
  and only when asked for by name);
* ``"cpp"``: the C++ ops built from ``csrc/`` (``torch.ops.entropix.*``), CPU;
* ``"torch"``: ``torch_ops.py``, plain torch on the reference, any device.

``"auto"`` picks, per op and device type, the first available of
:data:`AUTO_ORDER`: Triton then torch on CUDA, C++ then torch on CPU. The choice
is made once per (op, backend, device type) and cached
(:func:`resolve`); a CPU tensor never makes this module import Triton.
Every op has the same semantics on every backend; the tests compare each
backend with the float64 reference.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Callable, Optional, Tuple

import torch

from . import torch_ops
from .config import COEFF_NAMES
from .contract import K_MAX, AttnStats, AttnWorkspace, BranchParams, \
    LogitStats, decide_column_indices

logger = logging.getLogger("vllm.entropix")


BACKENDS = ("auto", "triton", "cpp", "torch")
#: What "auto" tries, in order, per device type (any other device: torch).
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

#: The columns of COEFF_NAMES (config) the fused decision reads (contract.DECIDE_COLUMNS order).
DECIDE_COLUMNS = decide_column_indices(COEFF_NAMES)


# ----------------------------------------------------------------------------
# The C++ ops, adapted to the implementations' common signatures
# ----------------------------------------------------------------------------
def _cpp_logit_stats(logits, num_candidates):
    mx, am, lse, ent, vent, cv, ci = torch.ops.entropix.logit_stats(logits.contiguous(),
                                                                    num_candidates)
    stats = LogitStats(mx, am, lse, ent, vent)
    return (stats, cv, ci) if num_candidates else (stats, None, None)


def _cpp_sample_candidates(cand_vals, cand_ids, temperature, top_k, top_p, min_p, n_draws,
                           noise):
    return torch.ops.entropix.sample_candidates(
        cand_vals.contiguous(), cand_ids.contiguous(), temperature.float().contiguous(),
        top_k.long().contiguous(), top_p.float().contiguous(), min_p.float().contiguous(),
        n_draws.long().contiguous(), noise.float().contiguous())


def _cpp_decide_and_sample(entropy, varentropy, attn, coeff_table, cand_vals, cand_ids,
                           noise, argmax, cot_token, prev_is_cot, logits):
    a = ((attn.attn_entropy, attn.attn_varentropy, attn.agreement, attn.interaction_strength)
         if attn is not None else (None,) * 4)
    tokens, branch, t, k, p, mp, n = torch.ops.entropix.decide_and_sample(
        entropy, varentropy, *a, coeff_table, list(DECIDE_COLUMNS), cand_vals, cand_ids, noise,
        argmax, cot_token, prev_is_cot, logits, K_MAX)
    return tokens, BranchParams(branch=branch, temperature=t, top_k=k, top_p=p, min_p=mp,
                                n_draws=n)


def _cpp_paged_attention_stats(q, key_cache, block_table, seq_lens, scale, out=None,
                               workspace=None):
    del workspace  # the C++ op needs no scratch
    st = AttnStats(*torch.ops.entropix.paged_attention_stats(q, key_cache, block_table,
                                                             seq_lens, float(scale)))
    return torch_ops.copy_attn_stats(st, out)


# ----------------------------------------------------------------------------
# The per-op table
# ----------------------------------------------------------------------------
def _triton(module: str, name: str, adapt: Optional[Callable] = None):
    return ("triton", f"entropix_vllm.triton_kernels.{module}", name, adapt)


def _with_columns(kernel_entry: Callable) -> Callable:
    """The Triton decision takes the table's column indices (kernels know no
    config): bind them, so every backend has the same signature."""
    return functools.partial(_decide_with_columns, kernel_entry)


def _decide_with_columns(kernel_entry, entropy, varentropy, attn, coeff_table, *rest):
    return kernel_entry(entropy, varentropy, attn, coeff_table, DECIDE_COLUMNS, *rest)


def _cpp(op_name: str, fn: Callable):
    return ("cpp", op_name, fn)


#: op -> {backend: how to get its implementation}. Triton: (module, function,
#: adapter or None), imported on first use; C++: the ``torch.ops.entropix`` op it
#: needs and the adapter; torch: the function of ``torch_ops``.
IMPLEMENTATIONS = {
    "logit_stats": {
        "triton": _triton("logit_stats", "fused_logit_stats"),
        "cpp": _cpp("logit_stats", _cpp_logit_stats),
        "torch": torch_ops.logit_stats_and_candidates,
    },
    "sample_candidates": {
        "triton": _triton("candidate_sampling", "sample_candidates"),
        "cpp": _cpp("sample_candidates", _cpp_sample_candidates),
        "torch": torch_ops.sample_candidates,
    },
    "decide_and_sample": {
        "triton": _triton("entropix_decide", "decide_and_sample", _with_columns),
        "cpp": _cpp("decide_and_sample", _cpp_decide_and_sample),
        "torch": torch_ops.decide_and_sample,
    },
    "paged_attention_stats": {
        "triton": _triton("attn_stats", "paged_attention_stats"),
        "cpp": _cpp("paged_attention_stats", _cpp_paged_attention_stats),
        "torch": torch_ops.paged_attention_stats,
    },
}
OPS = tuple(IMPLEMENTATIONS)


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
    """True when triton and the kernels import (this imports triton)."""
    try:
        import triton  # noqa: F401

        import entropix_vllm.triton_kernels  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _load(op: str, backend: str) -> Optional[Callable]:
    """The implementation of ``op`` on ``backend``, or None when unavailable."""
    entry = IMPLEMENTATIONS[op].get(backend)
    if entry is None:
        return None
    if backend == "torch":
        return entry
    if backend == "cpp":
        _, op_name, fn = entry
        return fn if cpp_available() and hasattr(torch.ops.entropix, op_name) else None
    _, module, name, adapt = entry
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        fn = getattr(importlib.import_module(module), name)
        return adapt(fn) if adapt is not None else fn
    except Exception as e:  # a broken Triton install: the next backend runs
        logger.warning("Entropix: the Triton kernel %s.%s does not import (%s: %s)", module,
                       name, type(e).__name__, e)
        return None


@functools.lru_cache(maxsize=None)
def resolve(op: str, backend: str = "auto", device_type: str = "cpu") -> str:
    """The backend that runs ``op`` for ``backend`` on tensors of ``device_type``.

    A named backend must exist for the op (ValueError) and be available
    (RuntimeError); ``"auto"`` takes the first available of :data:`AUTO_ORDER`.
    """
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    table = IMPLEMENTATIONS[op]
    if backend != "auto":
        if backend not in table:
            raise ValueError(f"backend {backend!r}: {op} has no {backend} implementation "
                             f"(it has {', '.join(table)})")
        if _load(op, backend) is None:
            why = {"cpp": "the entropix C++ extension is not built (pip install -e . builds "
                          "it) or lacks this op",
                   "triton": "triton or the Triton kernel is not importable"}[backend]
            raise RuntimeError(f"backend {backend!r} requested for {op} but {why}")
        return backend
    for be in AUTO_ORDER.get(device_type, ("torch",)):
        if be in table and _load(op, be) is not None:
            return be
    return "torch"


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The function that runs ``op`` (resolved once per op, backend and device type)."""
    return _implementation(op, backend, device.type)


@functools.lru_cache(maxsize=None)
def _implementation(op: str, backend: str, device_type: str) -> Callable:
    return _load(op, resolve(op, backend, device_type))


def describe(device_type: str) -> str:
    """``"op=backend, ..."`` for ``"auto"`` on ``device_type`` (for the start-up log)."""
    return ", ".join(f"{op}={resolve(op, 'auto', device_type)}" for op in OPS)


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------
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
    return implementation("logit_stats", backend, logits.device)(logits, num_candidates)


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
    fn = implementation("sample_candidates", backend, cand_vals.device)
    return fn(cand_vals, cand_ids, temperature, top_k, top_p, min_p, n_draws, noise)


def decide_and_sample(entropy: torch.Tensor, varentropy: torch.Tensor,
                      attn: Optional[AttnStats], coeff_table: torch.Tensor,
                      cand_vals: torch.Tensor, cand_ids: torch.Tensor, noise: torch.Tensor,
                      argmax: torch.Tensor, cot_token: torch.Tensor, prev_is_cot: torch.Tensor,
                      logits: torch.Tensor, backend: str = "auto"
                      ) -> Tuple[torch.Tensor, BranchParams]:
    """The Entropix decision and the token of every row (SPEC sections 3 and 4).

    entropy/varentropy ``[B]`` float32 (bits, bits^2; from
    :func:`logit_stats_and_candidates`); ``attn``: the rows' figures or None
    (zeros); ``coeff_table [B, len(COEFF_NAMES)]`` float64, columns in
    :data:`COEFF_NAMES` order (``contract.py``); cand_vals/cand_ids ``[B, K]``
    (K <= ``K_MAX``); ``noise [B, N, K]`` Exp(1) float32; ``argmax [B]``
    int64; ``cot_token [B]`` int64 (-1: none); ``prev_is_cot [B]`` bool;
    ``logits [B, V]`` (for the CoT token's mask: ``-inf`` forbids it).

    Per row: the branch and its parameters (``reference.branch_params``, in
    float64); a draw among the candidates with them
    (:func:`sample_candidates`, temperature/top_p/min_p in float32 and clamped
    to the ranges of ``contract.py``, top_k clamped to 1..K_MAX, n_draws to
    1..N); the token: the argmax for argmax rows, rows whose entropy or
    varentropy is not finite and rows whose temperature is not positive; the
    CoT token for insert rows unless the previous generated token was already
    it, it is out of ``0..V-1`` or its logit is not finite; the draw otherwise.
    Returns ``(tokens [B] int64, BranchParams)`` with float32
    temperature/top_p/min_p and int64 branch, top_k, n_draws (for rows with
    non-finite figures the integer parameters are unspecified). ``"triton"``
    does all of it in one launch, ``"cpp"`` in one C++ op
    (``csrc/decide.cpp``), ``"torch"`` as tensor ops on the reference
    (``torch_ops.decide_and_sample``, what the other two equal bit for bit).
    """
    fn = implementation("decide_and_sample", backend, entropy.device)
    return fn(entropy, varentropy, attn, coeff_table, cand_vals, cand_ids,
              noise, argmax, cot_token, prev_is_cot, logits)


def paged_attention_stats(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, backend: str = "auto",
                          out: Optional[torch.Tensor] = None,
                          workspace: Optional[AttnWorkspace] = None) -> AttnStats:
    """Attention figures (SPEC section 2) from a paged key cache.

    q ``[B, H, D]``: each sequence's query at the position being sampled.
    key_cache ``[num_blocks, block_size, H_kv, D]`` (any strides; fp32, fp16
    or bf16). block_table ``[B, max_blocks]`` int32/int64; seq_lens ``[B]``
    (L, the number of keys, current token included). Query head h reads kv
    head ``h // (H // H_kv)``; ``scale`` a Python float. Returns float32
    :class:`AttnStats`; a row with ``seq_len == 0`` gives zeros.

    ``out``: optional float32 ``[4, >= B]`` buffer (rows: attn_entropy,
    attn_varentropy, agreement, interaction_strength) whose first B columns
    receive the figures; the result is then its views ``out[i, :B]``.
    ``workspace``: from :func:`attention_workspace` with the same backend and
    device, for at least B requests of these heads. On the ``"triton"``
    backend a call with both allocates nothing, reads nothing back to the host
    and launches kernels whose grids depend only on B and the block table's
    shape (its width times the block size bounds the keys; programs past a
    request's length exit at once): it can be captured in a CUDA graph and
    replayed with new contents of the same tensors. ``"cpp"`` and ``"torch"``
    (CPU; torch reads the lengths on the host) compute the figures and copy
    them into ``out``; their workspace holds nothing.
    """
    B = q.shape[0] if q.dim() >= 1 else 0
    if out is not None:
        if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != 4 \
                or out.shape[1] < B:
            raise ValueError(f"out: expected a float32 [4, >= {B}] tensor, got {out.dtype} "
                             f"{tuple(out.shape)}")
        if out.device != q.device:
            raise ValueError(f"out is on {out.device}, q on {q.device}")
    if workspace is not None and workspace.device != q.device:
        raise ValueError(f"workspace is on {workspace.device}, q on {q.device}")
    fn = implementation("paged_attention_stats", backend, q.device)
    return fn(q, key_cache, block_table, seq_lens, scale, out=out, workspace=workspace)


def attention_workspace(max_batch: int, num_heads: int, num_kv_heads: int, device,
                        backend: str = "auto") -> AttnWorkspace:
    """The scratch :func:`paged_attention_stats` needs for up to ``max_batch``
    requests of ``num_heads`` query heads and ``num_kv_heads`` kv heads on
    ``device`` with ``backend`` (resolved as the op resolves it), allocated
    now, once: pass it with ``out=`` to every call. Its size does not depend
    on the number of keys (Triton: about ``4 * max(B * splits) * H`` floats,
    with ``B * splits`` at most a few times the SM count, plus
    ``3 * max_batch * H``). Not shared between concurrent calls.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # as tensors report it
        device = torch.device("cuda", torch.cuda.current_device())
    be = resolve("paged_attention_stats", backend, device.type)
    if be == "triton":
        make = getattr(importlib.import_module(IMPLEMENTATIONS["paged_attention_stats"]
                                               ["triton"][1]), "make_workspace")
        return make(int(max_batch), int(num_heads), int(num_kv_heads), device)
    if max_batch < 0 or num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"workspace: max_batch >= 0 and num_heads a multiple of num_kv_heads "
                         f"expected, got {max_batch}, {num_heads}, {num_kv_heads}")
    return AttnWorkspace(backend=be, max_batch=int(max_batch), num_heads=int(num_heads),
                         num_kv_heads=int(num_kv_heads), device=device)
