"""The tuner's pieces that need no server: calibration quantiles, the search
space, candidate coefficients and the objective (``entropix_vllm.tune``).
The whole tuner against a real server is what made the shipped preset
(``benchmarks/RESULTS.md``); its eval harness is tested end to end in
``tests/e2e/test_eval_e2e.py``."""

import random

import pytest

from entropix_vllm import tune
from entropix_vllm.config import EntropixConfig
from entropix_vllm.contract import K_MAX


def _calibration(n=101, seed=0):
    rng = random.Random(seed)
    return tune.Calibration({"entropy": sorted(rng.uniform(0, 6) for _ in range(n)),
                             "varentropy": sorted(rng.uniform(0, 16) for _ in range(n))})


def test_quantiles_interpolate_linearly_and_one_switches_off():
    cal = tune.Calibration({"entropy": [0.0, 1.0, 2.0, 3.0, 4.0], "varentropy": [5.0]})
    assert cal.quantile("entropy", 0.0) == 0.0
    assert cal.quantile("entropy", 0.5) == 2.0
    assert cal.quantile("entropy", 0.3) == pytest.approx(1.2)
    assert cal.quantile("entropy", 0.99) == pytest.approx(3.96)
    assert cal.quantile("varentropy", 0.7) == 5.0
    assert cal.quantile("entropy", 1.0) == tune.OFF
    with pytest.raises(ValueError, match="no entropy values"):
        tune.Calibration({"entropy": []}).quantile("entropy", 0.5)
    s = cal.summary()
    assert s["entropy"]["q50"] == 2.0 and s["entropy"]["tokens"] == 5


def test_draws_are_seeded_and_start_with_the_given_points():
    a = tune.draw_points(20, seed=3, include=tune.SEED_POINTS)
    b = tune.draw_points(20, seed=3, include=tune.SEED_POINTS)
    c = tune.draw_points(20, seed=4, include=tune.SEED_POINTS)
    assert a == b and a != c
    assert a[:len(tune.SEED_POINTS)] == [dict(p) for p in tune.SEED_POINTS]
    names = {p.name for p in tune.SPACE}
    for point in a:
        assert set(point) == names


@pytest.mark.parametrize("seed", range(5))
def test_every_candidate_is_a_valid_configuration(seed):
    """Whatever the draw and the model's figures, a candidate's coefficients are
    a valid EntropixConfig: thresholds in order, top_k within the kernel's
    candidates after the explore branch widens it, quantiles inside the
    calibration's range (or off)."""
    cal = _calibration(seed=seed)
    widen = 1.0 + EntropixConfig().lehv_top_k_agree_coef
    seeded = len(tune.SEED_POINTS)
    for i, point in enumerate(tune.draw_points(60, seed=seed, include=tune.SEED_POINTS)):
        c = tune.coefficients(point, cal)
        EntropixConfig().replace(c)
        assert c["low_ent_thresh"] <= c["med_ent_thresh"] <= c["high_ent_thresh"]
        assert c["top_k"] >= 1, point
        assert c["top_k"] * widen <= K_MAX, (point, c["top_k"])
        for p in tune.SPACE:
            if i < seeded and not p.of:
                continue      # hand-set seed points may sit between the choices
            if p.of:
                lo, hi = cal.values[p.of][0], cal.values[p.of][-1]
                assert c[p.name] == tune.OFF or lo - 1e-4 <= c[p.name] <= hi + 1e-4, p.name
            elif p.kind in ("uniform", "log", "int"):
                if p.name != "top_k":
                    assert p.lo - 1e-4 <= c[p.name] <= p.hi + 1e-4, p.name
            else:
                assert c[p.name] in p.choices, p.name


def _summary(acc, maj, share, samples=100):
    return {"accuracy": {"mean": acc}, "maj": {"mean": maj}, "samples": samples,
            "branches": None if share is None else {"sampled_share": share}}


def test_objective_needs_enough_sampled_tokens():
    assert tune.objective(_summary(0.4, 0.6, 0.5), 0.2) == pytest.approx(0.5)
    assert tune.objective(_summary(0.4, 0.6, 0.19), 0.2) is None   # greedy in disguise
    assert tune.objective(_summary(0.4, 0.6, None), 0.2) is None   # no trace, no claim
    cand = tune.Candidate("c", {}, {})
    cand.rounds = [_summary(0.2, 0.4, 0.5, samples=100), _summary(0.5, 0.7, 0.5, samples=300)]
    assert tune.pooled_objective(cand, 0.2) == pytest.approx((0.3 * 100 + 0.6 * 300) / 400)
    cand.rounds.append(_summary(0.9, 0.9, 0.1))
    assert tune.pooled_objective(cand, 0.2) is None
