"""What every backend of the Entropix ops agrees on (Triton, C++, torch).

The one owner of the facts the kernels share with ``ops.py``, the torch
versions (``torch_ops.py``) and the reference; backend-neutral and free of any
other import of this package (the Triton kernels import this module and nothing
else of the package):

* the result types of the ops (:class:`LogitStats`, :class:`AttnStats`,
  :class:`BranchParams`), the attention figures' preallocated scratch
  (:class:`AttnWorkspace`) and the branch codes of SPEC section 3;
* :data:`K_MAX`, the number of candidates the logit ops keep per row;
* the coefficient table of the fused decision: ``[B, C]`` float64 whose
  columns are :class:`~entropix_vllm.config.EntropixConfig`'s fields in field
  order, and :data:`DECIDE_COLUMNS`, the columns the decision reads, in the
  order of the C++ op's ``columns`` argument (its ``Col`` enum in
  ``csrc/decide.cpp``; ``tests/kernels/test_contract.py`` compares the two) and of
  the Triton kernel's ``I_<short name>`` launch constants;
* the clamps applied to the drawn parameters before the draw
  (:data:`TOP_P_MIN` ...), which the C++ op hard-codes
  (``csrc/decide.cpp``, checked by the same test);
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

if TYPE_CHECKING:  # annotations only: importing this module imports no torch
    import torch

#: Candidates the logit ops keep per row. Every branch samples with a top_k no
#: larger than this (``config.py`` validates the coefficients against it).
K_MAX = 128

# Branch codes (SPEC section 3 order).
ARGMAX, INSERT_COT, EXPLORE, RESAMPLE, ADAPTIVE = 0, 1, 2, 3, 4
BRANCH_NAMES = ("argmax", "insert_cot", "explore", "resample", "adaptive")

# ----------------------------------------------------------------------------
# The fused decision's coefficient columns: (short name, EntropixConfig field).
# The short names are the C++ `Col` enumerators and, prefixed with "I_", the
# Triton kernel's launch constants.
# ----------------------------------------------------------------------------
DECIDE_COLUMNS = (
    ("T0", "temperature"), ("P0", "top_p"), ("K0", "top_k"), ("M0", "min_p"),
    ("LE", "low_ent_thresh"), ("ME", "med_ent_thresh"), ("HE", "high_ent_thresh"),
    ("LV", "low_vent_thresh"), ("HV", "high_vent_thresh"),
    ("HELV_OFF", "helv_attn_ent_offset"), ("HELV_COEF", "helv_attn_ent_coef"),
    ("HELV_MAX", "helv_max_temp"),
    ("LEHV_OFF", "lehv_interaction_strength_offset"),
    ("LEHV_COEF", "lehv_interaction_strength_coef"), ("LEHV_MAX", "lehv_max_temp"),
    ("LEHV_MINK", "lehv_min_top_k"), ("LEHV_AGREE", "lehv_top_k_agree_coef"),
    ("HEHV_OFF", "hehv_attn_vent_offset"), ("HEHV_COEF", "hehv_attn_vent_coef"),
    ("HEHV_MIN", "hehv_min_temp"), ("HEHV_ENT", "hehv_attn_ent_coef"),
    ("HEHV_MINP", "hehv_min_top_p"),
    ("NADA", "n_adaptive_samples"), ("A_TL", "ada_temp_logits"),
    ("A_TA", "ada_temp_attn"), ("A_TG", "ada_temp_agree"), ("A_P", "ada_top_p"),
    ("A_PMIN", "ada_top_p_min"), ("A_PMAX", "ada_top_p_max"),
    ("A_KI", "ada_top_k_int"), ("A_KG", "ada_top_k_agree"),
    ("A_KMIN", "ada_top_k_min"), ("A_KMAX", "ada_top_k_max"), ("A_M", "ada_min_p"),
    ("A_MMIN", "ada_min_p_min"), ("A_MMAX", "ada_min_p_max"),
)


def decide_column_indices(coeff_names: Sequence[str]) -> tuple:
    """For each entry of :data:`DECIDE_COLUMNS`, its column in a table whose
    columns are ``coeff_names`` (the C++ op's ``columns`` argument)."""
    index = {n: i for i, n in enumerate(coeff_names)}
    missing = [field for _, field in DECIDE_COLUMNS if field not in index]
    if missing:
        raise ValueError(f"coeff_table: no column for {missing}")
    return tuple(index[field] for _, field in DECIDE_COLUMNS)


# ----------------------------------------------------------------------------
# Clamps of the drawn parameters (float32, after the branch parameters are
# rounded to float32): the draw sees top_p in [TOP_P_MIN, TOP_P_MAX] and min_p
# in [MIN_P_MIN, MIN_P_MAX]; top_k in [1, K_MAX], n_draws in [1, N].
# ----------------------------------------------------------------------------
TOP_P_MIN = 1e-6
TOP_P_MAX = 1.0
MIN_P_MIN = 0.0
MIN_P_MAX = 1.0 - 1e-6

# ----------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------
@dataclass
class LogitStats:
    """Per-row statistics of a ``[B, V]`` logits tensor (all fields ``[B]``)."""

    max: torch.Tensor
    argmax: torch.Tensor  # int64
    logsumexp: torch.Tensor
    entropy: torch.Tensor  # bits
    varentropy: torch.Tensor  # bits^2


@dataclass
class AttnStats:
    """Per-row attention figures of SPEC section 2 (all fields ``[B]``)."""

    attn_entropy: torch.Tensor
    attn_varentropy: torch.Tensor
    agreement: torch.Tensor
    interaction_strength: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, device=None, dtype=None) -> "AttnStats":
        import torch

        z = torch.zeros(batch, device=device, dtype=dtype or torch.float32)
        return cls(z, z.clone(), z.clone(), z.clone())


@dataclass
class AttnWorkspace:
    """Scratch of ``ops.paged_attention_stats``, allocated once by capacity
    (``ops.attention_workspace``): passed to every call with ``out=``, the call
    allocates nothing (CUDA graphs). The backend that made it owns its layout:
    the Triton kernels keep their partial results in ``scratch`` and their
    arrival counters (zero between calls) in ``counters``, with ``views`` the
    regions; the other backends need no scratch (both ``None``)."""

    backend: str  # the backend it was made for
    max_batch: int
    num_heads: int
    num_kv_heads: int
    device: "torch.device"
    scratch: "Optional[torch.Tensor]" = None  # float32
    counters: "Optional[torch.Tensor]" = None  # int32, zero between calls
    rows: Tuple[int, int] = (0, 0)  # Triton: partial rows of pass 1 and pass 2
    views: dict = field(default_factory=dict)  # Triton: the regions of scratch and counters


@dataclass
class BranchParams:
    """Per-row sampling parameters (all ``[B]``)."""

    branch: torch.Tensor  # int64 codes
    temperature: torch.Tensor
    top_k: torch.Tensor  # int64
    top_p: torch.Tensor
    min_p: torch.Tensor
    n_draws: torch.Tensor  # int64
