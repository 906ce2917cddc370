"""Tensor parallelism: attention figures over all heads, the same on every rank.

The tiny Llama of tests/tiny_model.py (4 query heads, 2 KV heads: both divide
by 2) runs in vLLM on CPU with tensor_parallel_size 1 and 2 (each rank bound to
its own core with VLLM_CPU_OMP_THREADS_BIND="0|1"). Each engine runs in its own
subprocess (this file, run as a script). Every step's figures of every request
must agree between TP 1 and TP 2 within 1e-4, both TP 2 ranks must hold the
same figures, and TP 2 must match HF eager attention (figures over all heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the shared helpers
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PROMPT_LENS = (9, 40, 130)
MAX_TOKENS = 6


def _run_engine(model: str, tp: int, out: str) -> None:
    """Script mode: one engine, write prompts, outputs and records to ``out``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import attention_rpc as R
    from tiny_model import tiny_prompt

    llm = LLM(model=model, dtype="float32", max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=64, enable_chunked_prefill=True,
              tensor_parallel_size=tp, seed=0, enforce_eager=True)
    assert llm.collective_rpc(R.rpc_install, args=(-1, True)) == ["ok"] * tp
    llm.collective_rpc(R.rpc_track_requests)
    prompts = [tiny_prompt(n, seed=10 + i) for i, n in enumerate(PROMPT_LENS)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    records = llm.collective_rpc(R.rpc_records, args=(True,))
    with open(out, "w") as f:
        json.dump({"prompts": prompts, "outputs": [list(o.outputs[0].token_ids) for o in outs],
                   "records": records}, f)


def _by_request(res):
    """{(request index, L): [4 figures]} from rank 0's records."""
    index = {tuple(p): i for i, p in enumerate(res["prompts"])}
    out = {}
    for rec in res["records"][0]:
        for ptoks, L, fig in zip(rec["prompt_token_ids"], rec["seq_lens"], rec["stats"]):
            key = (index[tuple(ptoks)], L)
            assert key not in out
            out[key] = fig
    return out


def _spawn(model, tp, out, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), model, str(tp), out],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"TP {tp} engine failed (rc {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


def test_tp2_figures_equal_tp1(tmp_path):
    import pytest
    import torch

    pytest.importorskip("vllm")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("TP 2 on CPU needs 2 cores (one per rank)")
    from hf_attention import figures_at, load_hf
    from tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    r1 = _spawn(model, 1, str(tmp_path / "tp1.json"))
    r2 = _spawn(model, 2, str(tmp_path / "tp2.json"))

    assert len(r2["records"]) == 2
    # Both ranks computed the figures over all heads: identical.
    assert [r["stats"] for r in r2["records"][0]] == [r["stats"] for r in r2["records"][1]]
    # Same greedy outputs, same rows.
    assert r1["outputs"] == r2["outputs"]
    f1, f2 = _by_request(r1), _by_request(r2)
    assert sorted(f1) == sorted(f2)
    assert len(f1) >= len(PROMPT_LENS) * MAX_TOKENS
    a = torch.tensor([f1[k] for k in sorted(f1)], dtype=torch.float64)
    b = torch.tensor([f2[k] for k in sorted(f1)], dtype=torch.float64)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert (a.std(0) > 1e-3).all()  # the figures vary: not a vacuous comparison

    # And TP 2 against HF eager attention (all heads).
    hf = load_hf(model)
    for i, p in enumerate(r2["prompts"]):
        keys = sorted(k for k in f2 if k[0] == i)
        want = torch.tensor(figures_at(hf, p + r2["outputs"][i], -1, [L for _, L in keys]),
                            dtype=torch.float64)
        got = torch.tensor([f2[k] for k in keys], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


if __name__ == "__main__":
    _run_engine(sys.argv[1], int(sys.argv[2]), sys.argv[3])
