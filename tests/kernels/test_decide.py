"""The fused Entropix decision and draw (``ops.decide_and_sample``): the Triton
kernel (``triton_kernels/entropix_decide.py``) and the C++ op
(``csrc/decide.cpp``) against the tensor-op path built on
``reference.branch_params`` and the reference candidate sampling.

Rows are drawn so that every branch of SPEC section 3 occurs, with figures
exactly at the thresholds too, random valid coefficients per row, attention
figures present or absent, rows with non-finite figures, CoT tokens that are
masked, out of range, absent or just emitted. Expected: the same tokens, the
same branch codes and the same float32 temperature/top_p/min_p to the bit,
the same integer top_k/n_draws where the figures are finite. Without CUDA the
Triton kernel runs in the Triton interpreter on CPU tensors; the C++ op runs
when the extension is built.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from entropix_vllm import ops, reference, step  # noqa: E402
from entropix_vllm.config import COEFF_NAMES, EntropixConfig  # noqa: E402
from entropix_vllm.contract import K_MAX  # noqa: E402
from entropix_vllm.reference import AttnStats  # noqa: E402

if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set before triton was imported",
                allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"


def random_config(g: torch.Generator) -> EntropixConfig:
    """Default settings with a random subset of coefficients moved (valid values)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    over = {}
    if torch.rand((), generator=g) < 0.7:
        over.update(temperature=u(0.2, 1.5), top_p=u(0.3, 1.0), top_k=int(u(1, 85)),
                    min_p=u(0.0, 0.2))
    if torch.rand((), generator=g) < 0.5:
        over.update(ada_temp_agree=u(0.0, 0.9), ada_top_k_int=u(0.0, 1.0),
                    ada_top_k_min=int(u(1, 10)), ada_top_k_max=int(u(20, K_MAX)),
                    n_adaptive_samples=int(u(1, 8)), ada_min_p_min=u(0.0, 0.05),
                    lehv_min_top_k=int(u(1, 20)), hehv_min_top_p=u(0.1, 0.9))
    if torch.rand((), generator=g) < 0.3:
        over.update(low_ent_thresh=u(0.0, 1.0), med_ent_thresh=u(1.0, 4.0),
                    high_ent_thresh=u(4.0, 7.0), high_vent_thresh=u(2.0, 7.0))
    return EntropixConfig().replace(over)


def make_case(B: int, V: int, seed: int, with_attn: bool = True, n_noise: int = 8):
    g = torch.Generator().manual_seed(seed)
    cfgs = [random_config(g) for _ in range(B)]
    logits = torch.randn(B, V, generator=g) * (0.5 + 4 * torch.rand(B, 1, generator=g))
    stats = reference.logit_stats(logits)
    ent = (torch.rand(B, generator=g) * 9).float()
    vent = (torch.rand(B, generator=g) * 9).float()
    # exact threshold values, tiny figures (argmax), non-finite figures
    ent[0::7] = 0.1
    vent[1::7] = 5.0
    ent[2::7], vent[2::7] = 0.01, 0.02
    ent[3::7], vent[3::7] = 6.0, 0.05
    ent[4::11] = float("nan")
    vent[5::13] = float("inf")
    ent[6::9] = stats.entropy[6::9].float()
    cv, ci = reference.topk_candidates(logits, K_MAX)
    noise = torch.empty(B, n_noise, K_MAX).exponential_(generator=g)
    cot = torch.randint(0, V, (B,), generator=g)
    cot[1::5] = -1
    cot[2::5] = V + 3
    logits[3::5, cot[3::5].clamp(0, V - 1)] = float("-inf")  # masked CoT token
    prev = torch.rand(B, generator=g) < 0.2
    attn = None
    if with_attn:
        attn = AttnStats(*(torch.rand(B, generator=g) * s for s in (4.0, 1.5, 0.05, 8.0)))
        attn.agreement[0::6] = 0.0
    table = torch.tensor(step.coefficient_rows(cfgs), dtype=torch.float64).reshape(B, -1)
    return dict(entropy=ent, varentropy=vent, attn=attn, coeff_table=table, cand_vals=cv,
                cand_ids=ci, noise=noise, argmax=stats.argmax, cot_token=cot,
                prev_is_cot=prev, logits=logits)


def to(case, device):
    out = {}
    for k, v in case.items():
        if isinstance(v, AttnStats):
            v = AttnStats(*(t.to(device) for t in (v.attn_entropy, v.attn_varentropy,
                                                   v.agreement, v.interaction_strength)))
        elif isinstance(v, torch.Tensor):
            v = v.to(device)
        out[k] = v
    return out


HAS_CPP_OP = ops.cpp_available() and hasattr(torch.ops.entropix, "decide_and_sample")
BACKENDS = ["triton", pytest.param("cpp", marks=pytest.mark.skipif(
    not HAS_CPP_OP, reason="C++ extension without decide_and_sample"))]


def compare(case, backend):
    want_tok, want = ops.decide_and_sample(**case, backend="torch")
    dev = DEVICE if backend == "triton" else "cpu"
    got_tok, got = ops.decide_and_sample(**to(case, dev), backend=backend)
    assert torch.equal(got.branch.cpu(), want.branch), (got.branch, want.branch)
    for f in ("temperature", "top_p", "min_p"):
        g_, w_ = getattr(got, f).cpu(), getattr(want, f)
        assert g_.dtype == torch.float32 and torch.equal(g_.isnan(), w_.isnan()), f
        assert torch.equal(g_[~w_.isnan()], w_[~w_.isnan()]), (f, g_, w_)
    fin = torch.isfinite(case["entropy"]) & torch.isfinite(case["varentropy"])
    for f in ("top_k", "n_draws"):
        g_, w_ = getattr(got, f).cpu(), getattr(want, f)
        assert g_.dtype == torch.int64 and torch.equal(g_[fin], w_[fin]), (f, g_, w_)
    assert torch.equal(got_tok.cpu(), want_tok), (got_tok, want_tok)
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_tensor_ops(seed, backend):
    want = compare(make_case(B=40, V=500, seed=seed), backend)
    # every branch occurred
    assert set(want.branch.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_attention_figures(backend):
    compare(make_case(B=24, V=300, seed=5, with_attn=False), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_candidates_and_noise_than_kmax(backend):
    case = make_case(B=16, V=40, seed=9, n_noise=3)
    case["cand_vals"], case["cand_ids"] = reference.topk_candidates(case["logits"], 40)
    case["noise"] = case["noise"][:, :, :40].contiguous()
    compare(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_and_empty_batch(backend):
    case = make_case(B=10, V=200, seed=13)
    case["logits"] = case["logits"].bfloat16()
    compare(case, backend)
    empty = make_case(B=1, V=50, seed=1)
    empty = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in empty.items()}
    empty["attn"] = None
    dev = DEVICE if backend == "triton" else "cpu"
    tok, params = ops.decide_and_sample(**to(empty, dev), backend=backend)
    assert tok.shape == (0,) and params.branch.shape == (0,)


def test_step_uses_the_fused_path_on_cuda_or_when_asked():
    """entropix_step with the Triton backend gives the tensor-op step's tokens."""
    g = torch.Generator().manual_seed(4)
    B, V = 12, 700
    logits = torch.randn(B, V, generator=g) * 3
    cfgs = [random_config(g) for _ in range(B)]
    table = step.coefficient_table(cfgs)
    cot = torch.full((B,), 7)
    prev = torch.zeros(B, dtype=torch.bool)
    noise = torch.empty(B, 8, K_MAX).exponential_(generator=g)
    want = step.entropix_step(logits, None, table, cot, prev, noise, backend="torch")
    dev = torch.device(DEVICE)
    got = step.entropix_step(logits.to(dev), None, table.to(dev), cot.to(dev), prev.to(dev),
                             noise.to(dev), backend="triton")
    assert torch.equal(got.tokens.cpu(), want.tokens)
    assert torch.equal(got.params.branch.cpu(), want.params.branch)
    # the table's columns are COEFF_NAMES
    cols = step.coefficient_columns(table)
    assert list(cols) == list(COEFF_NAMES)
    assert all(torch.equal(cols[n], torch.tensor([float(getattr(c, n)) for c in cfgs],
                                                 dtype=torch.float64)) for n in cols)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_top_k_rounds_half_to_even(backend):
    """K0 * (1 + ada_top_k_int * IS) = 40.5 and 67.5 exactly: torch.round gives
    40 and 68 (ties to even), and so must the kernel."""
    case = make_case(B=4, V=300, seed=11)
    cfg = EntropixConfig().replace({"top_k": 27, "ada_top_k_int": 0.5, "ada_top_k_max": 100})
    case["coeff_table"] = torch.tensor(step.coefficient_rows([cfg] * 4),
                                       dtype=torch.float64).reshape(4, -1)
    case["entropy"] = torch.full((4,), 4.0)
    case["varentropy"] = torch.full((4,), 1.0)  # the adaptive branch
    case["attn"] = AttnStats(torch.ones(4), torch.ones(4), torch.zeros(4),
                             torch.tensor([1.0, 3.0, 1.0, 3.0]))
    want = compare(case, backend)
    assert want.top_k.tolist() == [40, 68, 40, 68]
