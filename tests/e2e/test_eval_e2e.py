"""End to end: ``python -m entropix_vllm.eval`` against a real ``vllm serve
--sampler entropix`` of the bundled model, on the tiny shipped task file; and
presets over HTTP (a preset file loaded at start-up, the built-in presets by
name, refusals as HTTP 400 naming ``vllm_xargs.entropix_preset``, a start-up
error for an unknown engine preset).

The eval's figures are checked against what the server answers to requests
sent here directly: its greedy samples are the stock greedy completions, a
seeded Entropix sample is what the same request returns again, and the branch
mix counts exactly the tokens of the eval's Entropix requests in the trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

requests = pytest.importorskip("requests")

from entropix_vllm.config import builtin_presets  # noqa: E402
from entropix_vllm.eval.tasks import load_tasks  # noqa: E402

from e2e_server import Server, ServerSpec, ServerStartError, log_tail, start_servers, stop_all, vllm_executable  # noqa: E402,E501

# Fixed paths: vLLM's compile cache is keyed on additional_config.
WORK = os.path.join(tempfile.gettempdir(), "entropix-vllm-e2e-eval")
TRACE = os.path.join(WORK, "trace.jsonl")
PRESET_FILE = os.path.join(WORK, "my-preset.json")
MY_PRESET = {"name": "my-preset", "coefficients": {"low_ent_thresh": 0.5, "low_vent_thresh": 1e6,
                                                   "high_ent_thresh": 1e6,
                                                   "high_vent_thresh": 1e6,
                                                   "temperature": 0.9}}


@pytest.fixture(scope="module")
def model_path(bundled_model):
    return bundled_model


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    if not os.path.exists(vllm_executable()):
        pytest.skip(f"no vllm executable at {vllm_executable()}")
    os.makedirs(WORK, exist_ok=True)
    with open(PRESET_FILE, "w") as f:
        json.dump(MY_PRESET, f)
    log_dir = tmp_path_factory.mktemp("eval-logs")
    spec = ServerSpec("EV", ["--sampler", "entropix", "--max-num-seqs", "16",
                             f"--additional-config.entropix.trace_path={TRACE}",
                             f"--additional-config.entropix.presets={PRESET_FILE}"])
    started = start_servers([spec], model_path, log_dir, timeout=900)
    try:
        yield started["EV"]
    finally:
        stop_all(started.values())


def chat(server, model, messages, **body):
    r = requests.post(server.url + "/v1/chat/completions",
                      json={"model": model, "messages": messages, "max_tokens": 24, **body},
                      timeout=300)
    return r


def test_eval_cli_against_a_real_server(server, model_path, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [sys.executable, "-m", "entropix_vllm.eval", "--base-url", server.url, "--tasks", "tiny",
           "--sampler", "greedy", "--sampler", "t0.7-p0.9", "--sampler", "entropix-classic",
           "--sampler", "mine:preset=my-preset", "--seeds", "2", "--vote", "2",
           "--trace", TRACE, "--out", str(out), "--plot", str(png), "--concurrency", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + log_tail(server.log_path)
    for name in ("greedy", "t0.7-p0.9", "entropix-classic", "mine", "maj@2", "pass@2"):
        assert name in proc.stdout
    res = json.loads(out.read_text())
    items = load_tasks(["tiny"])
    by = {s["sampler"]["name"]: s for s in res["summaries"]}
    assert by["greedy"]["samples"] == len(items)                  # deterministic: once per item
    for name in ("t0.7-p0.9", "entropix-classic", "mine"):
        assert by[name]["samples"] == len(items) * 2 * 2
        assert by[name]["errors"] == 0
        assert by[name]["vs_baseline"]["baseline"] == "greedy"
    assert by["greedy"]["off_argmax_share"] == 0.0
    assert by["t0.7-p0.9"]["off_argmax_share"] > 0.0               # temperature 0.7 leaves argmax

    # Greedy samples are the server's stock greedy answers.
    greedy = {r["item"]: r for r in res["samples"]["greedy"]}
    for it in items:
        r = chat(server, model_path, list(it.messages), temperature=0,
                 vllm_xargs={"entropix": False})
        assert r.status_code == 200
        text = r.json()["choices"][0]["message"]["content"]
        assert greedy[it.id]["text"] == text
        assert greedy[it.id]["correct"] == it.is_correct(text)

    # A seeded Entropix sample is reproduced by the same request sent directly.
    row = res["samples"]["mine"][3]
    it = next(i for i in items if i.id == row["item"])
    r = chat(server, model_path, list(it.messages), seed=row["seed"],
             vllm_xargs={"entropix": True, "entropix_preset": "my-preset"})
    assert r.json()["choices"][0]["message"]["content"] == row["text"]

    # The branch mix covers exactly the eval's Entropix tokens; my-preset has only
    # argmax and adaptive branches (its other thresholds are off).
    for name in ("entropix-classic", "mine"):
        br = by[name]["branches"]
        tokens = sum(s["tokens"] for s in res["samples"][name])
        assert br["tokens"] == tokens
        assert abs(sum(br["mix"].values()) - 1.0) < 1e-9
    mix = by["mine"]["branches"]["mix"]
    assert set(k for k, v in mix.items() if v) <= {"argmax", "adaptive"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_cli_against_a_real_server(server, model_path, tmp_path):
    """``python -m entropix_vllm.tune`` end to end, small: its four steps run,
    the preset file loads and records the served model, the search rounds are
    the halving schedule, and the estimate's held-out count is what the
    held-out step then sends."""
    import re

    from entropix_vllm import tune
    from entropix_vllm.config import load_preset_file

    held = tmp_path / "held.jsonl"
    lines = open(os.path.join(os.path.dirname(load_tasks.__code__.co_filename), "data",
                              "heldout.jsonl")).read().splitlines()[:5]
    held.write_text("\n".join(lines) + "\n")
    out, results = tmp_path / "p.json", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "entropix_vllm.tune", "--base-url", server.url, "--trace", TRACE,
           "--tasks", "tiny", "--heldout", str(held), "--name", "e2e-tuned", "--out", str(out),
           "--trials", "2", "--keep", "1", "--dev-vote", "1", "--vote", "1",
           "--max-tokens", "8", "--concurrency", "8", "--no-progress", "--results", str(results),
           "--model-dir", model_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    err = proc.stderr
    for step in ("# 1/3 calibration", "# 2/3 search", "# 3/3 held-out"):
        assert step in err, err[-3000:]
    planned = int(re.search(r"then (\d+) held-out requests", err).group(1))
    sent = int(re.search(r"# 3/3 held-out: \d+ items, 6 samplers, (\d+) requests", err).group(1))
    assert planned == sent == 5 * (1 + 5 * 1 * 1)
    preset = load_preset_file(str(out), "test")
    assert preset.name == "e2e-tuned" and preset.match
    data = json.loads(out.read_text())
    n = data["provenance"]["search"]["candidates"]
    assert data["provenance"]["search"]["rounds"] == tune.halving_schedule(n, 1)
    assert set(data["provenance"]["heldout"]["results"]) >= {"greedy", "e2e-tuned"}
    assert json.loads(results.read_text())["rounds"]


def test_request_presets_over_http(server, model_path):
    msgs = [{"role": "user", "content": "Name a colour."}]
    # A built-in preset by name gives what its coefficients give when sent as keys.
    name = "smollm2-135m-instruct"
    coeffs = builtin_presets()[name].coefficients
    a = chat(server, model_path, msgs, seed=11, vllm_xargs={"entropix_preset": name})
    b = chat(server, model_path, msgs, seed=11, vllm_xargs={
        "entropix_preset": "classic", **{f"entropix_{k}": v for k, v in coeffs.items()}})
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
    for bad, needle in (("/etc/passwd", "cannot give a file path"),
                        (PRESET_FILE, "cannot give a file path"),
                        ("no-such-preset", "unknown preset"), (7, "expected a preset name")):
        r = chat(server, model_path, msgs, vllm_xargs={"entropix_preset": bad})
        assert r.status_code == 400, r.text
        assert "entropix_preset" in r.text and needle in r.text
    # The server still serves.
    assert chat(server, model_path, msgs, vllm_xargs={"entropix_preset": "my-preset"}).status_code == 200


def test_unknown_engine_preset_stops_start_up(model_path, tmp_path):
    if not os.path.exists(vllm_executable()):
        pytest.skip(f"no vllm executable at {vllm_executable()}")
    s = Server(ServerSpec("BAD", ["--sampler", "entropix",
                                  "--additional-config.entropix.preset=llama-9000"]),
               model_path, tmp_path)
    with pytest.raises(ServerStartError) as ei:
        start_servers([s.spec], model_path, tmp_path, timeout=300)
    assert "additional_config.entropix.preset" in str(ei.value)
    assert "unknown preset 'llama-9000'" in str(ei.value)
