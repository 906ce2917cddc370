"""Seeded MRV1 tokens and trace records are those recorded before the
integration redesign (issue 18).

``golden/mrv1_seeded.json`` was recorded on 2026-12-04 from main at the
commit before the redesign (9dfa2f9, ``ENTROPIX_RECORD_GOLDEN=1`` rewrites
it): a real in-process engine on the bundled model (float32, CPU, MRV1, the
C++ ops) serving one batch of seeded requests: Entropix rows with the
default preset, ``classic``, per-request coefficient overrides, a CoT token
override, an adaptive best-of-n setting, a prompt prefilled in chunks, and
seeded stock rows beside them. Token ids must be equal; trace records equal
key by key (request order, index, branch and integer fields exactly; float
figures within 1e-6 relative: the C++ kernels' SIMD paths may round
differently on another CPU).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from entropix_vllm import bundled  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "mrv1_seeded.json"
RECORD = os.environ.get("ENTROPIX_RECORD_GOLDEN") == "1"
LONG = " ".join(f"Row {i}: the {['amber', 'teal', 'plum'][i % 3]} crate weighs {i * 3 % 17} kg."
                for i in range(70))

# (prompt, max_tokens, seed, extra_args)
REQUESTS = [
    ("What is the capital of France?", 16, 1, None),
    ("Write a two-line poem about the sea.", 16, 2, {"entropix_preset": "classic"}),
    ("List three prime numbers.", 16, 3, {"entropix_preset": "classic",
                                          "entropix_low_ent_thresh": 0.3,
                                          "entropix_n_adaptive_samples": 3}),
    ("Explain gravity to a child.", 16, 4, {"entropix_preset": "classic",
                                            "entropix_cot_token": 30}),
    (LONG + " Which crate is heaviest?", 16, 5, {"entropix_preset": "classic"}),
    ("Tell me a fun fact.", 16, 6, {"entropix": False}),
    ("Name a color.", 16, 7, {"entropix_preset": "classic", "entropix_top_k": 5,
                              "entropix_n_adaptive_samples": 5,
                              "entropix_high_ent_thresh": 2.0}),
    ("Say something kind.", 16, 8, {"entropix": False}),
    ("Translate 'cat' to French.", 16, 9, None),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    from vllm import LLM, SamplingParams

    trace = str(tmp_path_factory.mktemp("golden") / "trace.jsonl")
    llm = LLM(bundled.bundled_model_path(), dtype="float32", max_model_len=2048,
              max_num_batched_tokens=256, max_num_seqs=16,
              additional_config={"sampler": "entropix", "entropix": {"trace_path": trace}})
    params = [SamplingParams(max_tokens=n, seed=s, ignore_eos=True, extra_args=x)
              for _, n, s, x in REQUESTS]
    outs = llm.generate([p for p, _, _, _ in REQUESTS], params, use_tqdm=False)
    del llm
    # the trace holds vLLM's internal ids: the request's id plus "-<suffix>"
    order = {o.request_id: i for i, o in enumerate(outs)}
    recs = [json.loads(line) for line in open(trace)]
    by_req: dict = {}
    for r in recs:
        rid = r.pop("request_id")
        i = order[rid if rid in order else rid.rsplit("-", 1)[0]]
        by_req.setdefault(str(i), []).append(r)
    for v in by_req.values():
        v.sort(key=lambda r: r["index"])
    got = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "trace": by_req}
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=0) + "\n")
    return got


def test_seeded_tokens_are_the_recorded_ones(run):
    want = json.loads(GOLDEN.read_text())
    assert run["tokens"] == want["tokens"]
    # the golden run covered what it claims
    assert sum(len(v) for v in want["trace"].values()) == 16 * 7
    assert {r["branch"] for v in want["trace"].values() for r in v} >= {"argmax"}
    assert len({r["branch"] for v in want["trace"].values() for r in v}) >= 3


def test_trace_records_are_the_recorded_ones(run):
    want = json.loads(GOLDEN.read_text())["trace"]
    got = run["trace"]
    assert sorted(got) == sorted(want)
    for req in want:
        assert len(got[req]) == len(want[req]), req
        for g, w in zip(got[req], want[req]):
            assert list(g) == list(w)
            for k, wv in w.items():
                gv = g[k]
                if isinstance(wv, float) and not (isinstance(wv, float) and math.isnan(wv)):
                    assert gv == pytest.approx(wv, rel=1e-6, abs=1e-9), (req, w["index"], k)
                elif isinstance(wv, float):
                    assert isinstance(gv, float) and math.isnan(gv), (req, w["index"], k)
                else:
                    assert gv == wv, (req, w["index"], k)
