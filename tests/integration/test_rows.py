"""The per-request state both samplers share (``integration/rows.py``): the
row table, MRV1's slot map and the noise policy.

The policy, stated independently here: a seeded Entropix request draws, per
sample that produces a token, ``n_draws x K_MAX`` Exp(1) values from a
``torch.Generator`` seeded with its seed (fresh, as vLLM's MRV1 runner makes
it), nothing for a discarded sample; its tokens do not depend on the rest of
the batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from entropix_vllm import step  # noqa: E402
from entropix_vllm.config import EntropixConfig  # noqa: E402
from entropix_vllm.contract import K_MAX  # noqa: E402
from entropix_vllm.integration.rows import RowConfig, RowTable, SlotMap, seeded_generator  # noqa: E402


def _row(cfg: EntropixConfig, enabled=True, cot=-1) -> RowConfig:
    return RowConfig(enabled=enabled, coeffs=step.coefficient_rows([cfg])[0], cot_token=cot,
                     n_draws=cfg.n_adaptive_samples)


def test_put_flush_gather():
    t = RowTable(6, "cpu")
    a, b = EntropixConfig(), EntropixConfig(n_adaptive_samples=3, top_k=9)
    t.put(4, _row(a, cot=7))
    t.put(1, _row(b))
    t.put(2, None)                                  # a stock request
    t.put(3, _row(a, enabled=False))                # Entropix off by request
    t.flush()
    table, cot, on = t.gather(torch.tensor([1, 4, 2, 3]))
    assert torch.equal(table, step.coefficient_table([b, a, EntropixConfig(), EntropixConfig()])
                       * torch.tensor([[1.0], [1.0], [0.0], [0.0]]))
    assert cot.tolist() == [-1, 7, -1, -1] and on.tolist() == [True, True, False, False]
    t.put(4, None)                                  # slot reused / freed
    t.flush()
    assert t.gather(torch.tensor([4]))[2].tolist() == [False]


def test_noise_policy_against_an_independent_reference():
    t = RowTable(4, "cpu")
    cfgs = [EntropixConfig(n_adaptive_samples=n) for n in (1, 3, 2, 5)]
    seeds = {0: 11, 1: 12, 3: 14}                   # slot 2: unseeded
    for s, c in enumerate(cfgs):
        t.put(s, _row(c), seeded_generator(seeds[s], "cpu") if s in seeds else None)
    ref = {s: torch.Generator().manual_seed(v) for s, v in seeds.items()}
    slots = np.array([3, 0, 2, 1])
    for step_no in range(4):
        draws = np.array([True, step_no != 1, True, step_no != 2])   # discarded samples
        noise = t.noise(slots, draws)
        assert noise.shape == (4, 5, K_MAX)
        for row, s in enumerate(slots):
            if s in seeds and draws[row]:
                want = torch.empty(cfgs[s].n_adaptive_samples, K_MAX).exponential_(
                    generator=ref[s])
                assert torch.equal(noise[row, :cfgs[s].n_adaptive_samples], want), (step_no, s)
        assert (noise > 0).all()


def test_seeded_tokens_do_not_depend_on_the_batch():
    V = 1000
    row = 2.0 * torch.randn(1, V, generator=torch.Generator().manual_seed(3))

    def run(other_draws, others):
        t = RowTable(8, "cpu")
        cfgs = [EntropixConfig()] + [EntropixConfig(n_adaptive_samples=other_draws)] * others
        for s, c in enumerate(cfgs):
            t.put(s, _row(c), seeded_generator(1234, "cpu") if s == 0 else None)
        t.flush()
        slots = np.arange(len(cfgs))
        table, cot, _ = t.gather(torch.from_numpy(slots))
        logits = torch.cat([row, 2.0 * torch.randn(others, V)]) if others else row
        toks = []
        for _ in range(4):
            noise = t.noise(slots, np.ones(len(cfgs), bool))
            toks.append(int(step.entropix_step(logits, None, table, cot,
                                               torch.zeros(len(cfgs), dtype=torch.bool),
                                               noise).tokens[0]))
        return toks

    alone = run(5, 0)
    assert run(9, 3) == alone
    assert run(2, 6) == alone


def test_slot_map_follows_the_batch():
    t = RowTable(3, "cpu")
    filled = []

    def fill(rid, slot):
        filled.append((rid, slot))
        t.put(slot, _row(EntropixConfig(), enabled=rid != "b"))

    m = SlotMap(t)
    assert m.update(["a", "b"], fill) and not m.update(["a", "b"], fill)
    assert m.slots_np.tolist() == [m.slot_of["a"], m.slot_of["b"]]
    assert m.enabled_np.tolist() == [True, False]
    assert m.update(["c", "a"], fill)               # b left, c came: b's slot reused
    assert filled[-1][0] == "c" and m.slot_of["c"] == dict(filled)["b"]
    assert m.slots_dev.tolist() == m.slots_np.tolist() and m.enabled_np.tolist() == [True, True]
    with pytest.raises(IndexError):
        m.update(["c", "a", "d", "e"], fill)        # more requests than slots
