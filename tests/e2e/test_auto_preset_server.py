"""``preset: auto`` in real ``vllm serve --sampler entropix`` processes (issue #16).

Three servers, started at once for the module (``tests/e2e_server.py``; no
compilation, ``--compilation-config {"mode": 0}``, so each starts in well under
a minute; what is tested here does not depend on it):

* **A** the bundled model, ``--sampler entropix`` and nothing else: the
  engine's default preset, ``auto``;
* **B** a renamed copy of the bundled model (its files symlinked into a folder
  with another name), ``--additional-config.entropix.preset=auto``;
* **C** a tiny random model (``tests/tiny_model.py``), for which no preset
  exists, ``--sampler entropix``.

Checked: the start-up log line naming the preset and why (A, B: the bundled
model's preset; C: classic, saying that no preset records the model); on A,
ordinary chat prompts trace mostly argmax tokens (the token the model finds
most likely, from the response's logprobs), the traced branches are those of
the preset's thresholds (recomputed in float64), and ``entropix_preset:
"auto"``, the preset's own name and no preset key give the same seeded
tokens; B answers exactly as A; on C ``auto`` is ``classic``; unknown presets
still get HTTP 400, and a bad preset file (a malformed ``match``, a file named
``auto``) still stops start-up.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

from entropix_vllm.config import EntropixConfig, builtin_presets  # noqa: E402
from entropix_vllm.report.reader import read_trace, recompute_branches  # noqa: E402

from e2e_server import (CHAT_PROMPTS, ServerSpec, ServerStartError, start_servers,  # noqa: E402
                        stop_all)
from tiny_model import make_tiny_llama, tiny_prompt  # noqa: E402

SMOL = "smollm2-135m-instruct"
NO_COMPILE = ["--compilation-config", '{"mode": 0}']
HTTP_TIMEOUT = 300
PROMPTS = list(CHAT_PROMPTS)
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, bundled_model, vllm_cli):
    smol = bundled_model
    work = tmp_path_factory.mktemp("auto-preset")
    renamed = work / "renamed" / "my-favourite-model"
    renamed.mkdir(parents=True)
    for f in Path(smol).iterdir():
        (renamed / f.name).symlink_to(f)
    tiny = make_tiny_llama(str(work / "tiny"))
    traces = {name: str(work / f"trace-{name}.jsonl") for name in "ABC"}

    def spec(name, extra=()):
        return ServerSpec(name, ["--sampler", "entropix", *NO_COMPILE,
                                 f"--additional-config.entropix.trace_path={traces[name]}",
                                 *extra])

    starts = [(spec("A"), smol),
              (spec("B", ["--additional-config.entropix.preset=auto"]), str(renamed)),
              (spec("C", ["--max-model-len", "1024"]), tiny)]
    # start_servers takes one model for its specs: one call per server, at once.
    with cf.ThreadPoolExecutor(max_workers=len(starts)) as ex:
        futs = [ex.submit(start_servers, [s], model, work / "logs", 900) for s, model in starts]
        cf.wait(futs)
    started, errors = {}, []
    for f in futs:
        if f.exception() is not None:
            errors.append(f.exception())
        else:
            started.update(f.result())
    if errors:
        stop_all(started.values())
        raise errors[0]
    try:
        yield {"servers": started, "models": {"A": smol, "B": str(renamed), "C": tiny},
               "traces": traces}
    finally:
        stop_all(started.values())
        print(f"vLLM server logs: {work / 'logs'}")


def log_text(ctx, name):
    return Path(ctx["servers"][name].log_path).read_text(errors="replace")


def preset_lines(ctx, name):
    return [ln[ln.index("Entropix preset "):] for ln in log_text(ctx, name).splitlines()
            if "Entropix preset " in ln]


def chat(ctx, name, prompt, seed, xargs=None, **body):
    r = requests.post(ctx["servers"][name].url + "/v1/chat/completions", timeout=HTTP_TIMEOUT,
                      json={"model": ctx["models"][name], "max_tokens": MAX_TOKENS, "seed": seed,
                            "messages": [{"role": "user", "content": prompt}],
                            "return_token_ids": True, **body,
                            **({"vllm_xargs": xargs} if xargs is not None else {})})
    return r


def ok(r):
    assert r.status_code == 200, (r.status_code, r.text[:1000])
    return r.json()


def records_of(ctx, name, response_ids, counts, timeout=60.0):
    """The trace records of these responses, once the asynchronous writer has
    written one per generated token."""
    deadline = time.time() + timeout
    while True:
        recs = read_trace(ctx["traces"][name]) if os.path.exists(ctx["traces"][name]) else []
        mine = {rid: sorted((r for r in recs if r["request_id"].startswith(rid + "-")),
                            key=lambda r: r["index"]) for rid in response_ids}
        if all(len(mine[rid]) == n for rid, n in zip(response_ids, counts)) or time.time() > deadline:
            return mine
        time.sleep(0.5)


# ----------------------------------------------------------------------------
# A: the bundled model, no preset named
# ----------------------------------------------------------------------------
def test_start_up_names_the_bundled_models_preset(ctx):
    lines = preset_lines(ctx, "A")
    assert len(lines) == 1, lines                    # one line (the worker of TP rank 0)
    assert lines[0].startswith(f"Entropix preset {SMOL} (auto, the default: made for this model: "
                               f"the built-in preset '{SMOL}' records its architecture, "
                               "tokenizer and weights (model fingerprint "), lines[0]


def test_chat_prompts_trace_mostly_argmax_tokens(ctx):
    with cf.ThreadPoolExecutor(max_workers=8) as ex:
        outs = list(ex.map(lambda i: ok(chat(ctx, "A", PROMPTS[i], seed=i, logprobs=True,
                                             top_logprobs=2)), range(len(PROMPTS))))
    ids = [o["id"] for o in outs]
    tokens = [o["choices"][0]["token_ids"] for o in outs]
    recs = records_of(ctx, "A", ids, [len(t) for t in tokens])
    argmax_tokens = total = 0
    traced = []
    for o, toks in zip(outs, tokens):
        rs = recs[o["id"]]
        assert [r["token_id"] for r in rs] == toks   # the trace is of these tokens
        traced += rs
        # vLLM lists the sampled token and the most likely ones: with two, the
        # most likely token is always among them.
        for lp in o["choices"][0]["logprobs"]["content"]:
            total += 1
            argmax_tokens += max(t["logprob"] for t in lp["top_logprobs"]) <= lp["logprob"] + 1e-6
    share = argmax_tokens / total
    branch_share = sum(r["branch"] == "argmax" for r in traced) / len(traced)
    print(f"auto on {len(PROMPTS)} chat prompts: {total} tokens, {share:.0%} argmax tokens, "
          f"{branch_share:.0%} by the argmax branch")
    assert share >= 0.8, share
    # The branches are those of the preset's thresholds, recomputed from the traced figures.
    assert recompute_branches(traced, builtin_presets()[SMOL].config()) == \
        [r["branch"] for r in traced]
    # SPEC's defaults (classic) on the same prompts and seeds, same server: far fewer.
    with cf.ThreadPoolExecutor(max_workers=8) as ex:
        classic = list(ex.map(lambda i: ok(chat(ctx, "A", PROMPTS[i], seed=i,
                                                xargs={"entropix_preset": "classic"})),
                              range(len(PROMPTS))))
    crecs = records_of(ctx, "A", [o["id"] for o in classic],
                       [len(o["choices"][0]["token_ids"]) for o in classic])
    ctraced = [r for o in classic for r in crecs[o["id"]]]
    assert recompute_branches(ctraced, EntropixConfig()) == [r["branch"] for r in ctraced]
    assert sum(r["branch"] == "argmax" for r in ctraced) / len(ctraced) < branch_share


def test_request_auto_is_the_engine_default_and_the_named_preset(ctx):
    p = PROMPTS[4]
    default = ok(chat(ctx, "A", p, seed=21))["choices"][0]["token_ids"]
    auto = ok(chat(ctx, "A", p, seed=21, xargs={"entropix_preset": "auto"}))
    named = ok(chat(ctx, "A", p, seed=21, xargs={"entropix_preset": SMOL}))
    assert auto["choices"][0]["token_ids"] == default == named["choices"][0]["token_ids"]


def test_unknown_and_path_presets_keep_their_http_400(ctx):
    for bad, needle in (("no-such-preset", "unknown preset 'no-such-preset'"),
                        ("Auto", "unknown preset 'Auto'"),
                        ("/etc/passwd", "cannot give a file path"),
                        (7, "expected a preset name")):
        r = chat(ctx, "A", "Hi", seed=1, xargs={"entropix_preset": bad})
        assert r.status_code == 400, (bad, r.status_code, r.text[:300])
        assert "vllm_xargs.entropix_preset" in r.text and needle in r.text, r.text[:500]
        assert "auto" in r.text
    assert requests.get(ctx["servers"]["A"].url + "/health", timeout=10).status_code == 200


# ----------------------------------------------------------------------------
# B: a renamed copy
# ----------------------------------------------------------------------------
def test_renamed_copy_gets_the_same_preset(ctx):
    lines = preset_lines(ctx, "B")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Entropix preset {SMOL} (additional_config.entropix.preset=auto: "
                               f"made for this model: the built-in preset '{SMOL}'"), lines[0]
    fingerprint = lambda line: line.split("model fingerprint ")[1][:12]  # noqa: E731
    assert fingerprint(lines[0]) == fingerprint(preset_lines(ctx, "A")[0])
    # The same seeded answer as the original's (same weights, same preset).
    for i in (0, 6):
        a = ok(chat(ctx, "A", PROMPTS[i], seed=40 + i))["choices"][0]["token_ids"]
        b = ok(chat(ctx, "B", PROMPTS[i], seed=40 + i))["choices"][0]["token_ids"]
        assert a == b, PROMPTS[i]


# ----------------------------------------------------------------------------
# C: a model with no preset
# ----------------------------------------------------------------------------
def test_model_without_preset_gets_classic_saying_so(ctx):
    lines = preset_lines(ctx, "C")
    assert len(lines) == 1, lines
    assert lines[0].startswith("Entropix preset classic (auto, the default: no built-in or "
                               "loaded preset records this model (model fingerprint "), lines[0]
    assert lines[0].endswith("so classic: SPEC section 3's defaults)"), lines[0]
    url, model = ctx["servers"]["C"].url, ctx["models"]["C"]

    def complete(i, xargs):
        r = requests.post(url + "/v1/completions", timeout=HTTP_TIMEOUT,
                          json={"model": model, "prompt": tiny_prompt(12, seed=i), "seed": 3 + i,
                                "max_tokens": 16, "ignore_eos": True, "return_token_ids": True,
                                "vllm_xargs": xargs})
        return ok(r)

    for i in range(2):
        auto = complete(i, {"entropix_preset": "auto"})
        classic = complete(i, {"entropix_preset": "classic"})
        default = complete(i, {})
        assert auto["choices"][0]["token_ids"] == classic["choices"][0]["token_ids"] == \
            default["choices"][0]["token_ids"]
        recs = records_of(ctx, "C", [default["id"]], [16])[default["id"]]
        assert len(recs) == 16
        assert recompute_branches(recs, EntropixConfig()) == [r["branch"] for r in recs]


# ----------------------------------------------------------------------------
# Start-up errors stay start-up errors
# ----------------------------------------------------------------------------
def test_bad_preset_files_stop_start_up(ctx, tmp_path):
    bad = tmp_path / "bad-match.json"
    bad.write_text(json.dumps({"name": "bad-match", "coefficients": {},
                               "match": {"scheme": "entropix-model-id/1",
                                         "architecture": "sha256:" + "0" * 64,
                                         "tokenizer": "sha256:" + "0" * 64,
                                         "weights": "not-a-hash"}}))
    named = tmp_path / "auto.json"
    named.write_text(json.dumps({"top_k": 3}))
    cases = [(f"preset={bad}", ("additional_config.entropix.preset", "match.weights",
                                "64 lowercase hex digits")),
             (f"presets={named}", ("additional_config.entropix.presets", "'auto' is reserved"))]
    # (An unknown engine preset name: tests/e2e/test_eval_e2e.py.) Both at once.

    def start(case):
        flag, _ = case
        spec = ServerSpec("BAD", ["--sampler", "entropix", *NO_COMPILE,
                                  f"--additional-config.entropix.{flag}"])
        try:
            servers = start_servers([spec], ctx["models"]["A"], tmp_path / flag.split("=")[0],
                                    timeout=300)
        except ServerStartError as e:
            return str(e)
        stop_all(servers.values())
        return None

    with cf.ThreadPoolExecutor(max_workers=len(cases)) as ex:
        errors = list(ex.map(start, cases))
    for (flag, needles), error in zip(cases, errors):
        assert error is not None, f"{flag}: the server started"
        for needle in needles:
            assert needle in error, (needle, error[-2000:])
