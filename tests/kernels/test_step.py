"""The framework-neutral Entropix step (entropix_vllm/step.py) against the
float64 reference step (reference.sample_step), on every available backend.

The reference races over the whole vocabulary with noise indexed by token id;
the step races over each row's top-K candidates with noise indexed by
candidate rank. Giving the reference the step's noise at the candidates' ids
(and +inf, which can never win, elsewhere) makes both draw the same token, so
the comparison is exact, branch by branch.
"""

from __future__ import annotations

import math

import pytest
import torch

from entropix_vllm import ops, reference, step
from entropix_vllm.config import EntropixConfig
from entropix_vllm.contract import K_MAX
from entropix_vllm.reference import ADAPTIVE, ARGMAX, EXPLORE, INSERT_COT, RESAMPLE, AttnStats

BACKENDS = ["torch"] + (["cpp"] if ops.cpp_available() else [])


def _rows(kinds, V, gen):
    """Logit rows whose figures land in chosen branches (default thresholds)."""
    out = []
    for kind in kinds:
        if kind == "peaked":          # entropy ~ 0: argmax
            x = torch.randn(V, generator=gen, dtype=torch.float64)
            x[int(torch.randint(V, (1,), generator=gen))] += 40.0
        elif kind == "flat":          # entropy ~ log2 V, varentropy ~ 0: insert CoT
            x = 1e-3 * torch.randn(V, generator=gen, dtype=torch.float64)
        elif kind == "bimodal":       # one strong token + a flat tail: high varentropy
            x = torch.zeros(V, dtype=torch.float64) + 0.01 * torch.randn(V, generator=gen, dtype=torch.float64)
            x[:1] += float(torch.empty(1).uniform_(6.0, 9.0, generator=gen))
        else:                         # Gaussian logits: adaptive, mostly
            x = 2.0 * torch.randn(V, generator=gen, dtype=torch.float64)
        out.append(x)
    return torch.stack(out).float()


def _table(configs, device="cpu"):
    return step.coefficient_table(configs, device)


def _token_noise(cand_ids, noise_k, V):
    B, N, K = noise_k.shape
    nv = torch.full((B, N, V), math.inf, dtype=torch.float64)
    idx = cand_ids[:, None, :].expand(B, N, K)
    valid = idx >= 0
    nv.scatter_(2, idx.clamp_min(0), torch.where(valid, noise_k.double(), torch.full_like(nv[:, :, :K], math.inf)))
    return nv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [300, 4099])
def test_step_matches_reference_step(backend, V):
    gen = torch.Generator().manual_seed(V)
    kinds = ["peaked", "flat", "bimodal", "gauss"] * 4
    logits = _rows(kinds, V, gen)
    logits[3, :V // 3] = -math.inf                  # masked entries
    B = logits.shape[0]
    configs = [EntropixConfig(), EntropixConfig(top_k=40, min_p=0.0),
               EntropixConfig(n_adaptive_samples=3, top_p=0.7), EntropixConfig(temperature=1.1)] * 4
    table = _table(configs)
    attn = AttnStats(torch.rand(B, generator=gen) * 3, torch.rand(B, generator=gen),
                     torch.rand(B, generator=gen) * 0.2, torch.rand(B, generator=gen) * 4)
    cot = torch.tensor([7, 11, -1, 5] * 4)
    prev = torch.tensor([False, True, False, False] * 4)
    noise = torch.empty(B, 5, K_MAX).exponential_(generator=gen)

    got = step.entropix_step(logits, attn, table, cot, prev, noise, backend=backend)

    params = reference.branch_params(got.stats.entropy, got.stats.varentropy, attn,
                                     step.coefficient_columns(table))
    assert torch.equal(got.params.branch, params.branch)
    assert set(params.branch.tolist()) >= {ARGMAX, INSERT_COT} and len(set(params.branch.tolist())) >= 3
    _, _, cand_ids = ops.logit_stats_and_candidates(logits, K_MAX, backend="torch")
    want = reference.sample_step(logits, params, _token_noise(cand_ids, noise, V),
                                 cot_token=cot, prev_is_cot=prev)
    assert got.tokens.tolist() == want.tolist()
    # argmax rows: the argmax of the masked row; insert rows: the CoT token when allowed
    am = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, -math.inf)).argmax(-1)
    for b in range(B):
        if params.branch[b] == ARGMAX:
            assert got.tokens[b] == am[b]
        if params.branch[b] == INSERT_COT and cot[b] >= 0 and not prev[b]:
            assert got.tokens[b] == cot[b]
        assert math.isfinite(float(logits[b, got.tokens[b]]))


def test_every_branch_and_its_parameters():
    """Thresholds per row force each branch on one Gaussian row."""
    V = 512
    gen = torch.Generator().manual_seed(1)
    logits = _rows(["gauss"] * 5, V, gen)
    stats = reference.logit_stats(logits)
    ent, vent = stats.entropy, stats.varentropy
    base = EntropixConfig()
    big = 1e6
    configs = [
        base.replace({"low_ent_thresh": big, "low_vent_thresh": big}),                     # argmax
        base.replace({"high_ent_thresh": 0.0, "low_vent_thresh": big}),                    # insert
        base.replace({"high_ent_thresh": big, "high_vent_thresh": 0.0}),                   # explore
        base.replace({"high_ent_thresh": 0.0, "med_ent_thresh": 0.0, "high_vent_thresh": 0.0}),  # resample
        base.replace({"high_vent_thresh": big}),                                           # adaptive
    ]
    table = _table(configs)
    cot = torch.full((5,), 3)
    noise = torch.empty(5, 5, K_MAX).exponential_(generator=gen)
    got = step.entropix_step(logits, None, table, cot, torch.zeros(5, dtype=torch.bool), noise)
    assert got.params.branch.tolist() == [ARGMAX, INSERT_COT, EXPLORE, RESAMPLE, ADAPTIVE]
    assert got.tokens[0] == logits[0].argmax()
    assert got.tokens[1] == 3
    T0, K0, P0 = base.temperature, base.top_k, base.top_p
    assert got.params.temperature[2].item() == pytest.approx(min(1.5, T0 * 1.2))
    assert got.params.top_k[2].item() == max(5, int(K0 * 1.5))
    assert got.params.temperature[3].item() == pytest.approx(max(2.0, T0 * 2.0))
    lu = float(ent[4] + vent[4])
    assert got.params.temperature[4].item() == pytest.approx(T0 * (1 + 0.3 * lu), rel=1e-6)
    assert got.params.top_p[4].item() == pytest.approx(min(1.0, max(0.1, P0)), rel=1e-6)
    assert got.params.n_draws.tolist() == [1, 1, 1, 1, 5]


def test_insert_falls_back_when_masked_or_repeated():
    V = 256
    logits = torch.zeros(2, V)          # flat: entropy 8 bits, varentropy 0 -> insert
    logits[1, 9] = -math.inf            # CoT token masked (e.g. by a grammar)
    table = _table([EntropixConfig()] * 2)
    noise = torch.empty(2, 5, K_MAX).exponential_(generator=torch.Generator().manual_seed(0))
    cot = torch.tensor([9, 9])
    got = step.entropix_step(logits, None, table, cot, torch.tensor([True, False]), noise)
    assert got.params.branch.tolist() == [INSERT_COT, INSERT_COT]
    assert got.tokens[0] != 9 or noise[0, 0].argmin() == 0   # repeated: sampled instead
    assert got.tokens[1] != 9                                 # masked: never emitted
    got2 = step.entropix_step(logits, None, table, cot, torch.tensor([False, False]), noise)
    assert got2.tokens[0] == 9


def test_nan_row_takes_argmax_path_and_never_crashes():
    logits = torch.randn(3, 100)
    logits[1, 5] = float("nan")
    table = _table([EntropixConfig()] * 3)
    noise = torch.empty(3, 5, K_MAX).exponential_()
    got = step.entropix_step(logits, None, table, torch.full((3,), -1), torch.zeros(3, dtype=torch.bool), noise)
    assert got.tokens.shape == (3,)
    assert 0 <= int(got.tokens[1]) < 100
