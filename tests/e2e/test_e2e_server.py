"""End to end: real ``vllm serve`` processes of the bundled model (CPU, float32),
driven through the OpenAI HTTP API.

Three servers, started at once for the whole module (``tests/e2e_server.py``):

* **E** ``--sampler entropix`` with a trace file (``--additional-config.entropix.trace_path``)
  and the ``classic`` preset named (the engine's default is ``auto``, which on the
  bundled model is its tuned preset; every expectation here is computed from SPEC
  section 3's defaults, ``EntropixConfig()``);
* **P** the plugin installed, no ``--sampler`` flag (must be vLLM unchanged);
* **N** ``VLLM_PLUGINS=none``: stock vLLM, no plugin loaded at all.

All three get the same flags and environment otherwise (``e2e_server.COMMON_FLAGS``,
``COMMON_ENV``: one OpenMP thread each, so they compute the same floats).

The trace file has a fixed path (in the system temp dir): vLLM's compile cache is
keyed on ``additional_config``, so a fixed path lets later runs reuse the compiled
model. Only what this run appends is read (from the file's size at start-up), and
records are matched to requests by their ids (the OpenAI response id plus ``-``
and 8 random characters; ``<i>_`` in front for the i-th choice of ``n > 1``), so
old lines, or another run's, never matter.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import re
import time
from dataclasses import dataclass

import pytest

requests = pytest.importorskip("requests")

from entropix_vllm.config import EntropixConfig, parse_request_args  # noqa: E402
from entropix_vllm.report.reader import read_trace, recompute_branches  # noqa: E402

from e2e_server import (CHAT_PROMPTS, ENTROPIX_TRACE_PATH, ServerSpec, ServerStartError,  # noqa: E402
                        log_tail, start_servers, stop_all, vllm_executable)

COT_TOKEN = 4563          # " ..." on the bundled model (the tokenizer's default CoT token)
EOS_TOKEN = 2             # <|im_end|>
TRACE_PATH = ENTROPIX_TRACE_PATH
HTTP_TIMEOUT = 300

# Per-request thresholds that force one branch for every token (SPEC section 3,
# rules evaluated in order; entropy and varentropy are > 0 on real logits).
FORCE = {
    "argmax": {"entropix_low_ent_thresh": 1e6, "entropix_low_vent_thresh": 1e6},
    "insert_cot": {"entropix_low_ent_thresh": 0, "entropix_high_ent_thresh": 0,
                   "entropix_low_vent_thresh": 1e6},
    "explore": {"entropix_low_ent_thresh": 0, "entropix_low_vent_thresh": 0,
                "entropix_high_ent_thresh": 1e6, "entropix_high_vent_thresh": 0},
    "resample": {"entropix_low_ent_thresh": 0, "entropix_low_vent_thresh": 0,
                 "entropix_med_ent_thresh": 0, "entropix_high_ent_thresh": 0,
                 "entropix_high_vent_thresh": 0},
    "adaptive": {"entropix_low_ent_thresh": 0, "entropix_low_vent_thresh": 0,
                 "entropix_high_ent_thresh": 1e6, "entropix_high_vent_thresh": 1e6},
}
STOCK = {"entropix": False}

PROMPTS = list(CHAT_PROMPTS)


# ----------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_path(bundled_model):
    return bundled_model


@pytest.fixture(scope="module")
def servers(model_path, tmp_path_factory):
    if not os.path.exists(vllm_executable()):
        pytest.skip(f"no vllm executable at {vllm_executable()}")
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    os.makedirs(os.path.dirname(TRACE_PATH), exist_ok=True)
    _TRACE["offset"] = os.path.getsize(TRACE_PATH) if os.path.exists(TRACE_PATH) else 0
    _TRACE["copy"] = str(log_dir / "trace-this-run.jsonl")
    specs = [
        ServerSpec("E", ["--sampler", "entropix",
                         f"--additional-config.entropix.trace_path={TRACE_PATH}",
                         "--additional-config.entropix.preset=classic"]),
        ServerSpec("P", []),
        ServerSpec("N", [], env={"VLLM_PLUGINS": "none"}),
    ]
    try:
        started = start_servers(specs, model_path, log_dir, timeout=900)
    except ServerStartError as e:
        print(str(e))
        raise
    try:
        yield {name: Client(s.url, model_path, name, s) for name, s in started.items()}
    finally:
        stop_all(started.values())
        print(f"vLLM server logs: {log_dir}")


@pytest.fixture(scope="module")
def E(servers):
    return servers["E"]


@pytest.fixture(scope="module")
def P(servers):
    return servers["P"]


@pytest.fixture(scope="module")
def N(servers):
    return servers["N"]


# ----------------------------------------------------------------------------
# HTTP client + a record of every Entropix request sent to E (for the trace)
# ----------------------------------------------------------------------------
@dataclass
class Sent:
    """An Entropix request sent to E and what came back."""

    response_id: str
    xargs: dict
    choice_token_ids: list          # per choice index
    exact: bool                     # the returned tokens are all the sampled ones (no stop strings)


SENT: list = []                     # every Entropix request E answered (module-wide)


class HTTPError(AssertionError):
    def __init__(self, status, text):
        self.status, self.text = status, text
        super().__init__(f"HTTP {status}: {text[:2000]}")


class Client:
    def __init__(self, url, model, name, server):
        self.url, self.model, self.name, self.server = url, model, name, server

    def post(self, path, body, expect_ok=True):
        body = {"model": self.model, **body}
        try:
            r = requests.post(self.url + path, json=body, timeout=HTTP_TIMEOUT)
        except requests.RequestException as e:
            raise AssertionError(f"server {self.name}: {e}\n{log_tail(self.server.log_path)}")
        if expect_ok and r.status_code != 200:
            raise HTTPError(r.status_code, r.text)
        return r

    def _record(self, body, out):
        if self.name != "E":
            return
        xargs = dict(body.get("vllm_xargs") or {})
        if str(xargs.get("entropix", True)).lower() in ("false", "0"):
            return
        ids = [c.get("token_ids") for c in out["choices"]]
        SENT.append(Sent(out["id"], xargs, ids, exact=not body.get("stop")))

    def chat(self, prompt="What is the capital of France?", **body):
        body.setdefault("messages", [{"role": "user", "content": prompt}])
        body.setdefault("max_tokens", 16)
        body.setdefault("return_token_ids", True)
        out = self.post("/v1/chat/completions", body).json()
        self._record(body, out)
        return out

    def completion(self, prompt="The capital of France is", **body):
        body.setdefault("prompt", prompt)
        body.setdefault("max_tokens", 16)
        body.setdefault("return_token_ids", True)
        out = self.post("/v1/completions", body).json()
        self._record(body, out)
        return out

    def stream_chat(self, prompt, **body):
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "stream": True, **body}
        r = requests.post(self.url + "/v1/chat/completions", json=body, stream=True,
                          timeout=HTTP_TIMEOUT)
        if r.status_code != 200:
            raise HTTPError(r.status_code, r.text)
        chunks = []
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunks.append(json.loads(data))
        return chunks

    def tokenize(self, text):
        r = self.post("/tokenize", {"prompt": text, "add_special_tokens": False})
        return r.json()["tokens"]


def parallel(calls):
    """Run zero-argument callables concurrently; results in order (re-raises)."""
    with cf.ThreadPoolExecutor(max_workers=max(1, len(calls))) as ex:
        futs = [ex.submit(c) for c in calls]
        return [f.result() for f in futs]


def choice_summary(out):
    return [(c["index"], c.get("message", {}).get("content", c.get("text")), c.get("token_ids"),
             c["finish_reason"]) for c in out["choices"]]


def tokens_of(out, i=0):
    ids = out["choices"][i]["token_ids"]
    assert ids is not None, "return_token_ids was not honoured"
    return list(ids)


def logprob_rows(out, i=0):
    """[(token id, logprob, [(id, logprob) top list])] of a chat choice
    (requires return_tokens_as_token_ids)."""
    rows = []
    for item in out["choices"][i]["logprobs"]["content"]:
        tid = int(item["token"].split(":", 1)[1])
        top = [(int(t["token"].split(":", 1)[1]), t["logprob"]) for t in item["top_logprobs"]]
        rows.append((tid, item["logprob"], top))
    return rows


# ----------------------------------------------------------------------------
# The trace
# ----------------------------------------------------------------------------
_RID = re.compile(r"^(?:(\d+)_)?(.+)-[0-9A-Za-z]{8}$")
_CMPL = re.compile(r"^(cmpl-[^-]+)-(\d+)$")


def split_trace_id(rid):
    """(response id, choice index) of a traced vLLM request id: vLLM appends
    ``-`` and 8 random characters to the request id, prefixes ``<i>_`` for the
    i-th of ``n > 1`` choices, and the completions endpoint suffixes ``-<k>`` for
    its k-th prompt (always one prompt here)."""
    m = _RID.match(rid)
    assert m, f"unexpected trace request id {rid!r}"
    core = m.group(2)
    c = _CMPL.match(core)
    if c:
        core = c.group(1)
    return core, int(m.group(1) or 0)


_TRACE = {"offset": 0, "copy": None}


def read_this_runs_trace():
    """The records appended to TRACE_PATH since the servers started, read with the
    project's own reader (``entropix_vllm.report.reader.read_trace``) from a copy of
    those complete lines."""
    if not os.path.exists(TRACE_PATH):
        return []
    with open(TRACE_PATH, "rb") as f:
        f.seek(_TRACE["offset"])
        data = f.read()
    data = data[:data.rfind(b"\n") + 1]          # complete lines only
    with open(_TRACE["copy"], "wb") as f:
        f.write(data)
    return read_trace(_TRACE["copy"])


def trace_for(expected, timeout=90.0):
    """Trace records of the given requests: ``expected`` maps (response id,
    choice index) to the number of records to wait for (at least). Returns
    ``{(response id, choice): [records in file order]}``."""
    deadline = time.time() + timeout
    while True:
        got = {k: [] for k in expected}
        for rec in read_this_runs_trace():
            key = split_trace_id(rec["request_id"])
            if key in got:
                got[key].append(rec)
        short = {k: (len(got[k]), n) for k, n in expected.items() if len(got[k]) < n}
        if not short:
            return got
        if time.time() > deadline:
            raise AssertionError(f"the trace {TRACE_PATH} lacks records (have, want): {short}")
        time.sleep(0.5)


def config_of(xargs) -> EntropixConfig:
    return parse_request_args(xargs, EntropixConfig())[1]


def check_trace_of_request(recs, xargs, token_ids, exact=True):
    """index 0..n-1, branches recomputed from the figures, tokens as returned."""
    idx = [r["index"] for r in recs]
    assert sorted(idx) == list(range(len(recs))), f"trace indices are not 0..n-1: {idx}"
    recs = sorted(recs, key=lambda r: r["index"])
    cfg = config_of(xargs)
    want = recompute_branches(recs, cfg)
    got = [r["branch"] for r in recs]
    assert got == want, f"traced branches {got} != recomputed {want} (xargs {xargs})"
    traced = [r["token_id"] for r in recs]
    if exact:
        assert traced == token_ids, f"traced tokens {traced} != returned {token_ids}"
    else:
        assert traced[:len(token_ids)] == token_ids, (traced, token_ids)
    return recs


def ids_in_trace_file():
    return {split_trace_id(r["request_id"])[0] for r in read_this_runs_trace()}


# ----------------------------------------------------------------------------
# 1. Mixed batches: stock rows on E are vLLM's stock sampler (N)
# ----------------------------------------------------------------------------
def _stock_requests():
    reqs = []
    for k, prompt in enumerate(PROMPTS[:2]):
        reqs.append(dict(prompt=prompt, temperature=0.0, seed=100 + k, max_tokens=24))
        reqs.append(dict(prompt=prompt, temperature=0.8, top_p=0.9, seed=200 + k, max_tokens=24))
    reqs.append(dict(prompt=PROMPTS[6], temperature=1.0, top_k=20, min_p=0.05, seed=250,
                     max_tokens=24))
    return reqs


def test_mixed_batch_stock_rows_equal_stock_vllm(E, N):
    stock = _stock_requests()
    ent = [dict(prompt=PROMPTS[2 + k], seed=300 + k, max_tokens=24) for k in range(3)]
    calls = [lambda b=b: E.chat(**b, vllm_xargs=STOCK) for b in stock]
    calls += [lambda b=b: E.chat(**b) for b in ent]
    outs = parallel(calls)                       # 8 requests, max-num-seqs 8: one batch
    stock_on_e, ent_on_e = outs[:len(stock)], outs[len(stock):]
    for o in ent_on_e:
        assert tokens_of(o), o
    stock_on_n = parallel([lambda b=b: N.chat(**b) for b in stock])
    for b, e, n in zip(stock, stock_on_e, stock_on_n):
        assert choice_summary(e) == choice_summary(n), f"request {b}"
    # the stock seeded-random requests really sample (not all greedy by accident)
    assert tokens_of(stock_on_e[1]) != tokens_of(stock_on_e[0]) or \
        tokens_of(stock_on_e[3]) != tokens_of(stock_on_e[2])
    # Entropix rows are traced; stock rows are not
    trace_for({(o["id"], 0): len(tokens_of(o)) for o in ent_on_e})
    traced = ids_in_trace_file()
    assert not traced & {o["id"] for o in stock_on_e}, "stock rows were traced as Entropix rows"


# ----------------------------------------------------------------------------
# 2. No --sampler flag: identical to stock vLLM
# ----------------------------------------------------------------------------
def _same_set_requests():
    return [
        ("chat", dict(prompt=PROMPTS[0], temperature=0.0, max_tokens=20, logprobs=True,
                      top_logprobs=3)),
        ("chat", dict(prompt=PROMPTS[1], temperature=0.8, top_p=0.9, seed=3, max_tokens=20,
                      logprobs=True, top_logprobs=3)),
        ("chat", dict(prompt=PROMPTS[4], temperature=1.0, top_k=20, min_p=0.05, seed=9, n=2,
                      max_tokens=16)),
        ("chat", dict(prompt=PROMPTS[3], temperature=0.7, seed=5, stop=["."], max_tokens=30,
                      frequency_penalty=0.5)),
        ("completion", dict(prompt="The quick brown fox", temperature=0.0, max_tokens=16,
                            logprobs=3, prompt_logprobs=2)),
        ("completion", dict(prompt="Once upon a time", temperature=0.9, seed=4, max_tokens=16,
                            presence_penalty=0.5, repetition_penalty=1.2, logprobs=2)),
    ]


def test_no_sampler_flag_is_stock_vllm(P, N):
    reqs = _same_set_requests()

    def run_all(client):
        return [getattr(client, kind)(**b) for kind, b in reqs]   # one at a time

    out_p, out_n = parallel([lambda: run_all(P), lambda: run_all(N)])
    for (kind, b), p, n in zip(reqs, out_p, out_n):
        assert p["choices"], p
        assert json.dumps(p["choices"], sort_keys=True) == json.dumps(n["choices"], sort_keys=True), \
            f"{kind} {b}:\nP {choice_summary(p)}\nN {choice_summary(n)}"
        assert p["usage"] == n["usage"]
        if "prompt_logprobs" in b:
            assert p["choices"][0]["prompt_logprobs"] is not None


# ----------------------------------------------------------------------------
# 3. Seeded reproducibility with Entropix
# ----------------------------------------------------------------------------
def test_entropix_seeded_reproducible_alone_and_in_batch(E):
    probe = dict(prompt=PROMPTS[1], seed=1234, max_tokens=32)
    alone = E.chat(**probe)
    others = [dict(prompt=PROMPTS[k], seed=50 + k, max_tokens=40) for k in range(2, 7)]
    others.append(dict(prompt=PROMPTS[7], max_tokens=40, seed=60,   # a deeper noise tensor
                       vllm_xargs={**FORCE["adaptive"], "entropix_n_adaptive_samples": 12}))
    others.append(dict(prompt=PROMPTS[0], temperature=0.8, max_tokens=40, vllm_xargs=STOCK))
    outs = parallel([lambda b=b: E.chat(**b) for b in others] + [lambda: E.chat(**probe)])
    in_batch = outs[-1]
    assert tokens_of(alone) == tokens_of(in_batch)
    assert alone["choices"][0]["message"]["content"] == in_batch["choices"][0]["message"]["content"]
    again = E.chat(**probe)
    assert tokens_of(again) == tokens_of(alone)

    by_seed = parallel([lambda s=s: E.chat(prompt=PROMPTS[1], seed=s, max_tokens=16)
                        for s in (1, 2, 3, 4, 5)])
    distinct = {tuple(tokens_of(o)) for o in by_seed}
    assert len(distinct) > 1, "five different seeds gave the same Entropix tokens"


def test_seeded_reproducible_with_long_prompts_in_one_batch(E):
    """Three ~1300-token prompts at once exceed vLLM's per-step token budget on a
    CPU server (max_num_batched_tokens 2048), so prefills are split across steps
    (chunked prefill). Seeded Entropix rows and seeded stock rows still give the
    tokens they give alone."""
    def prompt(tag, word):
        return (f"{tag}: summarise this list. " +
                " ".join(f"Entry {i} describes a {word} number {i}." for i in range(105)))

    for tag, xargs, extra in (("E2E-ent", {}, {}),
                              ("E2E-stock", STOCK, dict(temperature=0.9))):
        bodies = [dict(prompt=prompt(tag, w), seed=70 + k, max_tokens=10, vllm_xargs=xargs, **extra)
                  for k, w in enumerate(("river", "mountain", "forest"))]
        together = parallel([lambda b=b: E.chat(**b) for b in bodies])
        assert sum(o["usage"]["prompt_tokens"] for o in together) > 2048
        for b, o in zip(bodies, together):
            alone = E.chat(**b)
            assert tokens_of(o) == tokens_of(alone), (tag, b["seed"])


# ----------------------------------------------------------------------------
# 4. Logprobs with Entropix
# ----------------------------------------------------------------------------
def test_entropix_logprobs(E):
    bodies = [dict(prompt=PROMPTS[k], seed=s, max_tokens=20, logprobs=True, top_logprobs=5,
                   return_tokens_as_token_ids=True) for k, s in ((1, 1), (1, 2), (4, 3))]
    bodies.append(dict(prompt=PROMPTS[5], seed=4, max_tokens=20, logprobs=True, top_logprobs=5,
                       return_tokens_as_token_ids=True, vllm_xargs=FORCE["resample"]))
    outs = parallel([lambda b=b: E.chat(**b) for b in bodies])
    listed = 0
    for out in outs:
        ids = tokens_of(out)
        rows = logprob_rows(out)
        assert [t for t, _, _ in rows] == ids
        for tid, lp, top in rows:
            assert math.isfinite(lp) and lp <= 0.0, (tid, lp)
            assert len(top) == 5
            assert all(math.isfinite(v) and v <= 0.0 for _, v in top)
            listed_ids = [t for t, _ in top]
            assert len(set(listed_ids)) == 5, top
            # vLLM lists the sampled token first, then the most likely other tokens
            assert top[0][0] == tid, (tid, top)
            for t, v in top:
                if t == tid:
                    listed += 1
                    assert lp == v, (tid, lp, top)
            rest = [v for _, v in top[1:]]
            assert rest == sorted(rest, reverse=True), top
            assert sum(math.exp(v) for _, v in top) <= 1.0 + 1e-4, top
    assert listed > 0

    # The same logprobs, recomputed as prompt logprobs of prompt + generated tokens
    # (a prefill of the same sequence): the returned values are the model's raw
    # log-softmax at each position, for the token that was actually emitted.
    for out in outs[-2:]:
        prompt_ids = out.get("prompt_token_ids")
        assert prompt_ids, "return_token_ids gave no prompt_token_ids"
        gen = tokens_of(out)
        again = E.completion(prompt=list(prompt_ids) + gen, max_tokens=1, temperature=0.0,
                             prompt_logprobs=1, vllm_xargs=STOCK)
        plp = again["choices"][0]["prompt_logprobs"][len(prompt_ids):]
        assert len(plp) == len(gen)
        for (tid, lp, top), entry in zip(logprob_rows(out), plp):
            assert entry[str(tid)]["logprob"] == pytest.approx(lp, abs=2e-3), (tid, lp, entry)
            best = max(v["logprob"] for v in entry.values())
            assert best == pytest.approx(max(v for _, v in top), abs=2e-3), (entry, top)


def test_entropix_prompt_logprobs_completions(E):
    out = E.completion(prompt="The quick brown fox jumps over the", seed=7, max_tokens=8,
                       prompt_logprobs=1, logprobs=2)
    ch = out["choices"][0]
    prompt_ids = ch["prompt_token_ids"] if ch.get("prompt_token_ids") else out.get("prompt_token_ids")
    plp = ch["prompt_logprobs"]
    assert prompt_ids and plp is not None
    assert len(plp) == len(prompt_ids) == out["usage"]["prompt_tokens"]
    assert plp[0] is None
    for tid, entry in zip(prompt_ids[1:], plp[1:]):
        assert str(tid) in entry, (tid, entry)
        v = entry[str(tid)]
        assert math.isfinite(v["logprob"]) and v["logprob"] <= 0.0 and v["rank"] >= 1
    lps = ch["logprobs"]["token_logprobs"]
    assert len(lps) == len(ch["token_ids"]) and all(math.isfinite(v) for v in lps)
    trace_for({(out["id"], 0): len(ch["token_ids"])})   # it was an Entropix request


# ----------------------------------------------------------------------------
# 5. Structured output with Entropix
# ----------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Rome", "Madrid"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "population_millions", "is_capital"],
    "additionalProperties": False,
}


def test_entropix_structured_output(E):
    jsonschema = pytest.importorskip("jsonschema")
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    prompt = ("Answer in JSON with the keys city, population_millions and is_capital: "
              "which city is the capital of France?")
    outs = parallel([lambda s=s: E.chat(prompt=prompt, seed=s, max_tokens=120, response_format=rf)
                     for s in (1, 2, 3)])
    for out in outs:
        ch = out["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        doc = json.loads(ch["message"]["content"])
        jsonschema.validate(doc, SCHEMA)
        assert isinstance(doc["population_millions"], int) and not isinstance(
            doc["population_millions"], bool)
        assert isinstance(doc["is_capital"], bool)


# ----------------------------------------------------------------------------
# 6. Bad vllm_xargs
# ----------------------------------------------------------------------------
BAD_XARGS = [
    ({"entropix_bogus": 1}, "entropix_bogus"),
    ({"entropix_top_p": 1.5}, "entropix_top_p"),
    ({"entropix_min_p": -0.1}, "entropix_min_p"),
    ({"entropix_top_k": "many"}, "entropix_top_k"),
    ({"entropix_top_k": 2.5}, "entropix_top_k"),
    ({"entropix_n_adaptive_samples": 0}, "entropix_n_adaptive_samples"),
    ({"entropix": "maybe"}, "entropix"),
    ({"entropix_cot_token": "hello world"}, "entropix_cot_token"),
    ({"entropix_cot_token": 10 ** 6}, "entropix_cot_token"),
    ({"entropix_ada_top_k_min": 50, "entropix_ada_top_k_max": 10}, "entropix_ada_top_k_min"),
]


def _assert_400_naming(client, path_kind, xargs, key):
    body = {"vllm_xargs": xargs, "max_tokens": 4}
    if path_kind == "chat":
        body["messages"] = [{"role": "user", "content": "Hi"}]
        r = client.post("/v1/chat/completions", body, expect_ok=False)
    else:
        body["prompt"] = "Hi"
        r = client.post("/v1/completions", body, expect_ok=False)
    assert r.status_code == 400, (xargs, r.status_code, r.text[:500])
    msg = r.json()["error"]["message"]
    assert f"vllm_xargs.{key}" in msg, (xargs, msg)
    assert re.search(rf"vllm_xargs\.{re.escape(key)}(?![A-Za-z_])", msg), (xargs, msg)


@pytest.mark.parametrize("xargs,key", BAD_XARGS, ids=[k for _, k in BAD_XARGS])
def test_bad_xargs_rejected_on_entropix_server(E, xargs, key):
    _assert_400_naming(E, "chat", xargs, key)
    out = E.chat(prompt="Hi", max_tokens=4, seed=1)         # still serving
    assert tokens_of(out)


def test_bad_xargs_completions_and_stream(E):
    _assert_400_naming(E, "completion", {"entropix_top_p": 0}, "entropix_top_p")
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 4,
            "vllm_xargs": {"entropix_temperature": -1}}
    r = E.post("/v1/chat/completions", body, expect_ok=False)
    if r.status_code == 200:
        # vLLM validates a streamed request's parameters once the stream has begun
        # (exactly so for its own, e.g. an out-of-vocabulary allowed_token_ids):
        # the stream then carries one error event (code 400) and no tokens.
        events = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        errors = [e["error"] for e in events if "error" in e]
        assert len(errors) == 1 and errors[0]["code"] == 400, r.text[:500]
        assert "vllm_xargs.entropix_temperature" in errors[0]["message"], r.text[:500]
        assert not [e for e in events if e.get("choices")], r.text[:500]
    else:
        assert r.status_code == 400 and "vllm_xargs.entropix_temperature" in r.text, r.text[:500]
    # a valid text CoT token is accepted
    out = E.chat(prompt="Hi", max_tokens=4, seed=1, vllm_xargs={"entropix_cot_token": " ..."})
    assert tokens_of(out)


def test_entropix_keys_refused_without_sampler(P):
    _assert_400_naming(P, "chat", {"entropix": True}, "entropix")
    _assert_400_naming(P, "completion", {"entropix_top_p": 0.5}, "entropix_top_p")
    out = P.chat(prompt="Hi", max_tokens=4, temperature=0.0)
    assert tokens_of(out)
    out = P.chat(prompt="Hi", max_tokens=4, temperature=0.0, vllm_xargs={"other_plugin_key": 1})
    assert tokens_of(out)


# ----------------------------------------------------------------------------
# 7. The trace
# ----------------------------------------------------------------------------
def test_trace_matches_requests(E):
    cases = [
        dict(prompt=PROMPTS[1], seed=11, max_tokens=24),
        dict(prompt=PROMPTS[3], seed=12, max_tokens=24),
        dict(prompt=PROMPTS[4], seed=13, max_tokens=24,
             vllm_xargs={"entropix_high_ent_thresh": 2.5, "entropix_med_ent_thresh": 1.5,
                         "entropix_high_vent_thresh": 3.0}),
        dict(prompt=PROMPTS[6], seed=14, max_tokens=24, vllm_xargs=FORCE["argmax"]),
        dict(prompt=PROMPTS[5], seed=15, max_tokens=24,
             vllm_xargs={"entropix_low_ent_thresh": 0.5, "entropix_low_vent_thresh": 0.8,
                         "entropix_top_k": 10}),
    ]
    outs = parallel([lambda b=b: E.chat(**b) for b in cases])
    recs = trace_for({(o["id"], 0): len(tokens_of(o)) for o in outs})
    thresholds_mattered = False
    for b, o in zip(cases, outs):
        xargs = b.get("vllm_xargs", {})
        rs = check_trace_of_request(recs[(o["id"], 0)], xargs, tokens_of(o))
        check_trace_parameters(rs, config_of(xargs))
        if xargs and recompute_branches(rs, EntropixConfig()) != [r["branch"] for r in rs]:
            thresholds_mattered = True
    assert thresholds_mattered, "per-request thresholds never changed a branch"


def check_trace_parameters(recs, cfg):
    """temperature/top_k/top_p/min_p recomputed (float64) from the traced figures."""
    import torch

    from entropix_vllm.reference import AttnStats, branch_params

    def col(name):
        return torch.tensor([float(r[name]) for r in recs], dtype=torch.float64)

    attn = AttnStats(col("attn_entropy"), col("attn_varentropy"), col("agreement"),
                     col("interaction_strength"))
    coeffs = {n: getattr(cfg, n) for n in EntropixConfig.field_names()}
    p = branch_params(col("entropy"), col("varentropy"), attn, coeffs, dtype=torch.float64)
    for i, r in enumerate(recs):
        assert r["top_k"] == int(p.top_k[i]), (r, int(p.top_k[i]))
        for name, t in (("temperature", p.temperature), ("top_p", p.top_p), ("min_p", p.min_p)):
            assert r[name] == pytest.approx(float(t[i]), rel=1e-6, abs=1e-7), (name, r, float(t[i]))


# ----------------------------------------------------------------------------
# 8. Every branch, and the tokens agree with it
# ----------------------------------------------------------------------------
def test_every_branch_and_tokens_agree(E):
    cases = []
    for k, (branch, xargs) in enumerate(FORCE.items()):
        for j, extra in enumerate(({}, {"entropix_top_k": 5})):
            cases.append((branch, dict(prompt=PROMPTS[(k + 3 * j) % len(PROMPTS)], seed=40 + 2 * k + j,
                                       max_tokens=16, logprobs=True, top_logprobs=20,
                                       return_tokens_as_token_ids=True,
                                       vllm_xargs={**xargs, **extra})))
    outs = parallel([lambda b=b: E.chat(**b) for _, b in cases])
    recs = trace_for({(o["id"], 0): len(tokens_of(o)) for o in outs})
    seen = set()
    rank_checks = min_p_checks = cot_emitted = cot_followups = 0
    for (branch, b), out in zip(cases, outs):
        rs = check_trace_of_request(recs[(out["id"], 0)], b["vllm_xargs"], tokens_of(out))
        rows = logprob_rows(out)
        assert len(rows) == len(rs)
        prev = None
        for rec, (tid, lp, top) in zip(rs, rows):
            assert rec["branch"] == branch, (b["vllm_xargs"], rec)
            assert rec["token_id"] == tid
            seen.add(rec["branch"])
            # vLLM lists the sampled token first, then the most likely others:
            # the true top-1 is always listed.
            assert top[0][0] == tid and top[0][1] == lp, (tid, lp, top[:2])
            top1 = max(v for _, v in top)
            sampled = True
            if branch == "argmax":
                assert lp == pytest.approx(top1, abs=1e-6), (rec, top[:3])
                sampled = False
            elif branch == "insert_cot":
                if prev != COT_TOKEN:
                    assert tid == COT_TOKEN, (rec, prev)
                    cot_emitted += 1
                    sampled = False
                else:
                    cot_followups += 1      # after a CoT token: a sampled token
            if sampled:
                T, min_p, top_k = rec["temperature"], rec["min_p"], rec["top_k"]
                assert T > 0
                if min_p > 0:
                    assert lp - top1 >= T * math.log(min_p) - 1e-4, (rec, lp, top1)
                    min_p_checks += 1
                if top_k < len(top):
                    # the other listed tokens are the top len(top)-1 others, so a
                    # token of rank >= top_k has at least top_k listed above it
                    rank = sum(1 for _, v in top if v > lp + 1e-6)
                    assert rank < top_k, (rec, rank, top)
                    rank_checks += 1
            prev = tid
    assert seen == set(FORCE), seen
    assert cot_emitted > 0 and cot_followups > 0 and min_p_checks > 0 and rank_checks > 0, \
        (cot_emitted, cot_followups, min_p_checks, rank_checks)


# ----------------------------------------------------------------------------
# 9. n, stop strings, streaming, penalties, logit_bias, allowed_token_ids
# ----------------------------------------------------------------------------
def test_entropix_n2(E):
    out = E.chat(prompt=PROMPTS[1], seed=21, n=2, max_tokens=16)
    assert sorted(c["index"] for c in out["choices"]) == [0, 1]
    recs = trace_for({(out["id"], i): len(tokens_of(out, i)) for i in (0, 1)})
    for i in (0, 1):
        assert tokens_of(out, i)
        check_trace_of_request(recs[(out["id"], i)], {}, tokens_of(out, i))


def _base_text(E, prompt, seed, max_tokens=40):
    out = E.chat(prompt=prompt, seed=seed, max_tokens=max_tokens)
    return out, out["choices"][0]["message"]["content"]


def test_entropix_stop_string(E):
    out, text = _base_text(E, PROMPTS[3], seed=31)
    words = [w for w in re.findall(r"[A-Za-z]{3,}", text) if text.index(w) > 0]
    if not words:
        pytest.fail(f"no word to stop on in {text!r}")
    stop = words[len(words) // 2]
    cut = text.index(stop)
    stopped = E.chat(prompt=PROMPTS[3], seed=31, max_tokens=40, stop=[stop])
    ch = stopped["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["stop_reason"] == stop, ch
    assert ch["message"]["content"] == text[:cut]


def test_entropix_streaming_equals_non_streamed(E):
    for seed, prompt in ((32, PROMPTS[4]), (33, PROMPTS[1])):
        out, text = _base_text(E, prompt, seed=seed, max_tokens=32)
        chunks = E.stream_chat(prompt, seed=seed, max_tokens=32)
        streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks
                  if c["choices"] and c["choices"][0].get("finish_reason")]
        assert streamed == text
        assert finish == [out["choices"][0]["finish_reason"]]


# Each of these changes the bundled model's greedy answer to PENALTY_PROMPT.
PENALTIES = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
             dict(repetition_penalty=1.8)]
PENALTY_PROMPT = PROMPTS[1]


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: next(iter(p)))
def test_entropix_penalties_honoured(E, penalty):
    """Entropix forced to argmax with a penalty = vLLM's greedy with that penalty,
    and the penalty changes the output (so it reached the Entropix row)."""
    base = dict(prompt=PENALTY_PROMPT, max_tokens=24, seed=1)
    plain = E.chat(**base, vllm_xargs=FORCE["argmax"])
    ent = E.chat(**base, **penalty, vllm_xargs=FORCE["argmax"])
    stock = E.chat(**base, **penalty, temperature=0.0, vllm_xargs=STOCK)
    stock_plain = E.chat(**base, temperature=0.0, vllm_xargs=STOCK)
    assert tokens_of(plain) == tokens_of(stock_plain)
    assert tokens_of(stock) != tokens_of(stock_plain), f"{penalty} does not change greedy output"
    assert tokens_of(ent) == tokens_of(stock)


def test_entropix_logit_bias(E):
    prompt = PROMPTS[0]
    greedy = E.chat(prompt=prompt, max_tokens=16, vllm_xargs=FORCE["argmax"])
    banned = tokens_of(greedy)[0]
    bias = {str(banned): -100}
    forced = E.chat(prompt=prompt, max_tokens=16, logit_bias=bias, vllm_xargs=FORCE["argmax"])
    stock = E.chat(prompt=prompt, max_tokens=16, logit_bias=bias, temperature=0.0,
                   vllm_xargs=STOCK)
    assert banned not in tokens_of(forced)
    assert tokens_of(forced) == tokens_of(stock)
    outs = parallel([lambda s=s: E.chat(prompt=prompt, max_tokens=16, seed=s, logit_bias=bias)
                     for s in (1, 2, 3)])
    outs.append(E.chat(prompt=prompt, max_tokens=16, seed=4, logit_bias=bias,
                       vllm_xargs=FORCE["resample"]))
    for o in outs:
        assert banned not in tokens_of(o), (banned, tokens_of(o))


def test_entropix_bad_words_and_min_tokens(E):
    """vLLM's other logits processors reach Entropix rows: Entropix forced to
    argmax equals vLLM's greedy under the same bad_words / min_tokens, and each
    changes the answer."""
    prompt = PROMPTS[0]
    plain = tokens_of(E.chat(prompt=prompt, max_tokens=14, vllm_xargs=FORCE["argmax"]))
    assert plain[-1] == EOS_TOKEN and len(plain) < 12, plain   # a short answer
    for kw in (dict(bad_words=["Paris"]), dict(min_tokens=12)):
        ent = E.chat(prompt=prompt, max_tokens=14, vllm_xargs=FORCE["argmax"], **kw)
        stock = E.chat(prompt=prompt, max_tokens=14, temperature=0.0, vllm_xargs=STOCK, **kw)
        assert tokens_of(ent) == tokens_of(stock), kw
        assert tokens_of(ent) != plain, kw
    banned = E.tokenize(" Paris")
    outs = parallel([lambda s=s: E.chat(prompt=prompt, max_tokens=12, seed=s, bad_words=[" Paris"])
                     for s in (1, 2, 3)])
    for o in outs:
        assert not set(banned) & set(tokens_of(o)), (banned, tokens_of(o))
    outs = parallel([lambda s=s: E.chat(prompt=prompt, max_tokens=14, seed=s, min_tokens=12)
                     for s in (4, 5)])
    for o in outs:
        ids = tokens_of(o)
        assert len(ids) >= 12 and EOS_TOKEN not in ids[:12], ids


def test_entropix_per_request_cot_token(E):
    paris = E.tokenize(" Paris")
    assert len(paris) == 1
    cot = paris[0]
    outs = parallel([lambda c=c: E.chat(prompt=PROMPTS[1], max_tokens=10, seed=3,
                                        vllm_xargs={**FORCE["insert_cot"], "entropix_cot_token": c})
                     for c in (" Paris", cot)])
    for o in outs:
        ids = tokens_of(o)
        assert ids[0] == cot, ids
        for prev, tok in zip(ids, ids[1:]):
            if prev != cot:
                assert tok == cot, ids
        assert COT_TOKEN not in ids[::2], ids
        recs = trace_for({(o["id"], 0): len(ids)})[(o["id"], 0)]
        assert all(r["branch"] == "insert_cot" for r in recs)


def test_entropix_allowed_token_ids(E):
    allowed = set()
    for word in ("Yes", " yes", "No", " no", " maybe", ".", "!", " Paris", " London"):
        allowed.update(E.tokenize(word))
    allowed.add(EOS_TOKEN)
    assert COT_TOKEN not in allowed
    allowed = sorted(allowed)
    prompt = "Is Paris the capital of France? Answer yes or no."
    cases = [dict(seed=s) for s in (1, 2)]
    cases += [dict(seed=3, vllm_xargs=FORCE["insert_cot"]),
              dict(seed=4, vllm_xargs=FORCE["resample"]),
              dict(seed=5, vllm_xargs=FORCE["argmax"])]
    # min_p 0: nothing filters the masked (-inf) tokens among the candidates but the mask
    cases += [dict(seed=6 + k, vllm_xargs={**FORCE[b], "entropix_min_p": 0})
              for k, b in enumerate(("explore", "resample", "insert_cot"))]
    outs = parallel([lambda c=c: E.chat(prompt=prompt, max_tokens=12, allowed_token_ids=allowed, **c)
                     for c in cases])
    for c, o in zip(cases, outs):
        ids = tokens_of(o)
        assert ids and set(ids) <= set(allowed), (c, ids)
        assert COT_TOKEN not in ids
    # the insert-CoT request really was in that branch and had to sample instead
    cot_out = outs[2]
    recs = trace_for({(cot_out["id"], 0): len(tokens_of(cot_out))})[(cot_out["id"], 0)]
    assert recs and all(r["branch"] == "insert_cot" for r in recs)


# ----------------------------------------------------------------------------
# 7 (continued). Every Entropix request of this module against the trace
# ----------------------------------------------------------------------------
def test_trace_covers_every_entropix_request(E):
    assert SENT, "no Entropix requests were sent"
    expected = {}
    for s in SENT:
        for i, ids in enumerate(s.choice_token_ids):
            expected[(s.response_id, i)] = len(ids or [])
    recs = trace_for(expected)
    for s in SENT:
        for i, ids in enumerate(s.choice_token_ids):
            check_trace_of_request(recs[(s.response_id, i)], s.xargs, list(ids or []),
                                   exact=s.exact)
