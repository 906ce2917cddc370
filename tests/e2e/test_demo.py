"""The README's first command, ``bash scripts/demo.sh``, as a user runs it: it sets
up (already done here: a second ``setup.sh`` takes a second), serves the bundled
model with ``--sampler entropix`` and no preset named, asks one question with stock
greedy and with Entropix on that server, prints the branch report and stops the
server (about a minute on 2 cores)."""

from __future__ import annotations

import os
import re
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "Name three primary colours."


def test_demo_prints_both_answers_and_the_report(bundled_model):
    env = dict(os.environ, PROMPT=PROMPT, MAX_TOKENS="40", SEED="3")
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # auto, the engine default, named the bundled model's preset at start-up
    assert re.search(r"server log: Entropix preset smollm2-135m-instruct \(auto, the default: "
                     r"made for this model", out), out[-4000:]
    assert f"Prompt: {PROMPT}" in out  # PROMPT=... reaches the requests
    greedy = re.search(r"Stock greedy \(vLLM's sampler, temperature 0\): (\d+) tokens", out)
    ent = re.search(r"Entropix \(preset smollm2-135m-instruct, seed 3\): (\d+) tokens", out)
    assert greedy and ent, out[-4000:]
    n = int(ent.group(1))
    assert 0 < n <= 40 and 0 < int(greedy.group(1)) <= 40
    took = re.search(r"Entropix took the model's most likely token (?:(\d+) times out of (\d+)|"
                     r"at all (\d+) tokens)", out)
    assert took and int(took.group(2) or took.group(3)) == n
    # the report reads the answer's own trace records: one per token, no disagreements
    report = out[out.index("branch report of the Entropix answer"):]
    assert re.search(rf"requests: 1\s+tokens: {n}\b", report), report
    counts = [int(m) for m in re.findall(
        r"^\s+(?:argmax|insert_cot|explore|resample|adaptive)\s+(\d+)\s", report, re.M)]
    assert len(counts) == 5 and sum(counts) == n, report
    assert "disagreements with the recomputed branch: 0" in report
    # the server is gone: nothing listens on its port any more
    port = int(re.search(r"--port (\d+)", out).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
