"""One engine of the device check: builds a vLLM ``LLM`` from a spec, warms it up, then
answers the orchestrator (``check.py``) one command at a time.

    python engine_worker.py SPEC_JSON

Protocol: the process's original stdout carries only protocol lines, ``@@ {json}``;
everything else (vLLM's logs, prints) is sent to stderr, which the orchestrator writes to
the engine's log. Events: ``{"ev": "up"}`` at start; ``{"ev": "ready", "info": ...}`` once
built and warmed up; ``{"ev": "error", "phase": ..., "error": ...}`` when the build
fails (then the process exits); ``{"ev": "result", "id": N, ...}`` per command.
Commands (stdin, one JSON object a line): ``gen`` (one timed ``generate``), ``profile``
(torch.profiler over decode steps; in-process engines only), ``syncdebug``
(``torch.cuda.set_sync_debug_mode("warn")`` over decode steps), ``ramp`` (Triton compiles
while the batch shrinks), ``info``, ``quit``.

The engine's environment (runner, plugins, in-process engine core, ports) is set by the
orchestrator; the spec holds the rest (``engine_kwargs``).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import traceback
import warnings

_PROTO = None


def emit(obj) -> None:
    _PROTO.write("@@ " + json.dumps(obj, default=str) + "\n")
    _PROTO.flush()


def log(msg) -> None:
    print(f"[worker] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# engine construction (pure functions: unit-tested on CPU)
# ---------------------------------------------------------------------------
def engine_kwargs(spec: dict) -> dict:
    """``LLM(**kwargs)`` for a spec. GPU: dummy weights, bf16, TRITON_ATTN, native ops
    (``custom_ops: ["none"]``), eager or full CUDA graphs for decode without compilation;
    a fixed KV cache size (no memory profiling: several engines share the GPU)."""
    kw = dict(model=spec["model_dir"], dtype=spec.get("dtype", "bfloat16"), seed=0,
              max_model_len=spec.get("max_model_len", 1024),
              max_num_seqs=spec.get("max_num_seqs", 256))
    if spec.get("load_format"):
        kw["load_format"] = spec["load_format"]
    cc = {"custom_ops": ["none"]} if spec.get("device") == "cuda" else {}
    if spec.get("graphs"):
        kw["enforce_eager"] = False
        cc.update(mode="NONE", cudagraph_mode="FULL_DECODE_ONLY",
                  cudagraph_capture_sizes=list(spec.get("capture_sizes", [1, 64, 256])))
    else:
        kw["enforce_eager"] = True
    if cc:
        kw["compilation_config"] = cc
    if spec.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = int(spec["max_num_batched_tokens"])
    mem = spec.get("mem") or {}
    if spec.get("device") == "cuda":
        kw["attention_backend"] = "TRITON_ATTN"
        if mem.get("util"):
            # vLLM checks at start-up that this share of the GPU is free; the KV cache size is
            # fixed below, so engines starting together do not profile each other's memory
            kw["gpu_memory_utilization"] = mem["util"]
    if mem.get("kv_bytes"):
        kw["kv_cache_memory_bytes"] = int(mem["kv_bytes"])
    if spec.get("token_prompts"):
        kw["skip_tokenizer_init"] = True
    if spec.get("entropix"):
        section = {}
        if spec.get("cot_token") is not None:
            section["cot_token"] = spec["cot_token"]
        if spec.get("trace_path"):
            section["trace_path"] = spec["trace_path"]
        kw["additional_config"] = {"sampler": "entropix", **({"entropix": section} if section else {})}
    return kw


TOPICS = ["the sea", "a red fox", "prime numbers", "coffee", "the moon", "old maps",
          "rain in spring", "a small robot", "glass", "a quiet town", "winter stars", "bread"]


def make_prompts(spec: dict, n: int):
    """``n`` prompts, the same for every call with the same ``n``: text for models with a
    tokenizer, token ids (32-63 tokens, ids in the middle of the vocabulary) otherwise."""
    if spec.get("token_prompts"):
        import random

        rng = random.Random(1234)
        vocab = int(spec.get("vocab", 32000))
        lo, hi = min(1000, vocab // 4), max(vocab - 1000, vocab * 3 // 4)
        return [{"prompt_token_ids": [rng.randrange(lo, hi) for _ in range(32 + i % 32)]}
                for i in range(n)]
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i})." for i in range(n)]


def sampling_params(spec: dict, tokens: int, mode: str, seed=None):
    """Entropix rows: the engine's default (Entropix on); stock rows: ``extra_args=
    {"entropix": False}``; ``plain``: no extra arguments (engines without Entropix)."""
    from vllm import SamplingParams

    extra = {"entropix": False} if mode == "stock" else None
    return SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0, seed=seed,
                          detokenize=not spec.get("token_prompts"), extra_args=extra)


# ---------------------------------------------------------------------------
# what runs inside the engine's worker (LLM.collective_rpc; pickled by value)
# ---------------------------------------------------------------------------
def _rpc_info(worker):
    import sys as _sys

    out = {"worker": f"{type(worker).__module__}.{type(worker).__qualname__}"}
    mr = getattr(worker, "model_runner", None)
    out["runner"] = f"{type(mr).__module__}.{type(mr).__qualname__}" if mr is not None else None
    s = getattr(mr, "sampler", None)
    out["sampler"] = f"{type(s).__module__}.{type(s).__qualname__}" if s is not None else None
    cc = worker.vllm_config.compilation_config
    out["cudagraph_mode"] = getattr(cc.cudagraph_mode, "name", str(cc.cudagraph_mode))
    out["compilation_mode"] = getattr(cc.mode, "name", str(cc.mode))
    out["capture_sizes"] = list(cc.cudagraph_capture_sizes or [])
    out["plugin_loaded"] = "entropix_vllm.integration.plugin" in _sys.modules
    disp = getattr(mr, "cudagraph_dispatcher", None)
    keys = getattr(disp, "cudagraph_keys", None)
    if isinstance(keys, dict):
        out["graph_keys"] = {getattr(k, "name", str(k)): len(v) for k, v in keys.items()}
    mgr = getattr(mr, "cudagraph_manager", None)
    if mgr is not None:
        out["mrv2_graph_manager"] = type(mgr).__name__
    return out


# ---------------------------------------------------------------------------
class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.llm = None
        self.cuda = spec.get("device") == "cuda"
        self.info = {}

    # -- build -------------------------------------------------------------
    def build(self):
        from vllm import LLM

        kw = engine_kwargs(self.spec)
        log("LLM(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")")
        env = {k: os.environ.get(k) for k in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_PLUGINS",
                                                "VLLM_ENABLE_V1_MULTIPROCESSING")}
        log(f"environment: {env}")
        t0 = time.monotonic()
        self.llm = LLM(**kw)
        self.info["engine_up_s"] = round(time.monotonic() - t0, 1)
        self.info["kwargs"] = {k: v for k, v in kw.items() if k != "model"}
        self.info.update(self.describe())
        log(f"engine up in {self.info['engine_up_s']} s: {self.info}")

    def describe(self) -> dict:
        import vllm

        cfg = self.llm.llm_engine.vllm_config
        cc = cfg.compilation_config
        d = {"vllm": vllm.__version__,
             "front_end_cudagraph_mode": getattr(cc.cudagraph_mode, "name", str(cc.cudagraph_mode)),
             "async_scheduling": getattr(cfg.scheduler_config, "async_scheduling", None)}
        try:
            d["engine"] = self.llm.collective_rpc(_rpc_info)[0]
        except Exception as e:  # noqa: BLE001 (reported, not fatal)
            d["engine_rpc_error"] = f"{type(e).__name__}: {e}"[:400]
        return d

    def warm(self):
        """One short generate per (concurrency, mode) the engine will be asked for: JIT
        compiles and graph captures happen here, not in a timed call. The second pass's
        times (``info["warm"]``) let the orchestrator size its time boxes."""
        t0 = time.monotonic()
        self.info["warm"] = []
        for w in self.spec.get("warm", []):
            for mode in w["modes"]:
                r = self.gen(w["conc"], w["tokens"], mode)
                r2 = self.gen(w["conc"], w["tokens"], mode)
                log(f"warm-up {mode} conc {w['conc']} x {w['tokens']}: {r['seconds']:.2f} s, again {r2['seconds']:.2f} s")
                self.info["warm"].append({"conc": w["conc"], "mode": mode, "tokens": w["tokens"],
                                          "first_s": r["seconds"], "seconds": r2["seconds"]})
        self.info["warm_s"] = round(time.monotonic() - t0, 1)

    # -- commands ----------------------------------------------------------
    def gen(self, conc: int, tokens: int, mode: str) -> dict:
        prompts = make_prompts(self.spec, conc)
        sp = sampling_params(self.spec, tokens, mode)
        # (no torch.cuda.synchronize() here: with the engine core in another process this
        # process has no CUDA context, and generate() returns once every token has arrived)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        ids = [list(o.outputs[0].token_ids) for o in outs]
        ntok = sum(len(x) for x in ids)
        c = collections.Counter(t for x in ids for t in x)
        top = c.most_common(1)[0] if c else (None, 0)
        return {"conc": conc, "tokens_per_request": tokens, "mode": mode, "requests": len(outs),
                "tokens": ntok, "seconds": round(dt, 4), "tok_s": round(ntok / dt, 2) if dt > 0 else None,
                "complete": ntok == conc * tokens, "top_token": top[0],
                "top_token_share": round(top[1] / ntok, 4) if ntok else None}

    def seeded(self, conc: int, tokens: int, mode: str = "entropix") -> dict:
        """Token ids of ``conc`` seeded requests (seed 1000 + i) decoded together: the
        same call on another engine (MRV2, say) must give the same ids."""
        prompts = make_prompts(self.spec, conc)
        sps = [sampling_params(self.spec, tokens, mode, seed=1000 + i) for i in range(conc)]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        return {"conc": conc, "tokens_per_request": tokens, "mode": mode,
                "ids": [list(o.outputs[0].token_ids) for o in outs]}

    def _engine(self):
        import vllm.envs as envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError("this command needs the engine core in this process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        return self.llm.llm_engine

    def _start_batch(self, n, mode, tag, max_tokens=None, per_request_tokens=None):
        """Adds n requests, steps until each has its first token; returns a step function."""
        eng = self._engine()
        prompts = make_prompts(self.spec, n)
        ids = []
        for i, p in enumerate(prompts):
            mt = per_request_tokens[i] if per_request_tokens else (max_tokens or 400)
            rid = f"{tag}-{i}"
            eng.add_request(rid, p, sampling_params(self.spec, mt, mode))
            ids.append(rid)
        ntok = {}

        def step():
            outs = eng.step()
            new = 0
            for o in outs:
                k = len(o.outputs[0].token_ids)
                new += k - ntok.get(o.request_id, 0)
                ntok[o.request_id] = k
            return len(outs), new

        k = 0
        while len(ntok) < n:
            step()
            k += 1
            if k > 80:
                raise RuntimeError(f"after {k} steps only {len(ntok)} of {n} requests produced a token")
        return eng, ids, step, k, ntok

    def _finish(self, eng, ids):
        try:
            eng.abort_request(ids)
        except Exception as e:  # noqa: BLE001 (tidying up only)
            log(f"abort failed: {e}")
        for _ in range(50):  # drain: the engine must be idle for the next command
            if not eng.has_unfinished_requests():
                break
            eng.step()

    def profile(self, n: int, steps: int, warm: int, mode: str, top: int = 15) -> dict:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        trace_before = self.trace_summary(wait=False)

        eng, ids, step, prefill, _ = self._start_batch(n, mode, f"prof-{mode}-{time.monotonic_ns()}")
        for _ in range(warm):
            step()
        plain = []
        for _ in range(steps):
            t = time.perf_counter()
            nreq, new = step()
            plain.append({"ms": round((time.perf_counter() - t) * 1e3, 3), "new_tokens": new})
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        prof_steps = []
        with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
            for i in range(steps):
                t = time.perf_counter()
                with record_function(f"gpucheck_step_{i:02d}"):
                    nreq, new = step()
                prof_steps.append({"ms": round((time.perf_counter() - t) * 1e3, 3), "new_tokens": new})
            if self.cuda:
                torch.cuda.synchronize()
        self._finish(eng, ids)
        trace_after = self.trace_summary()
        ka = prof.key_averages()
        tables = {}
        for title, keys in (("self_cpu", ["self_cpu_time_total"]),
                            ("self_device", ["self_device_time_total", "self_cuda_time_total"]),
                            ("device_total", ["device_time_total", "cuda_time_total"])):
            if title != "self_cpu" and not self.cuda:
                continue
            for key in keys:
                try:
                    tables[title] = {"sort": key, "table": ka.table(sort_by=key, row_limit=top,
                                                                    max_name_column_width=60)}
                    break
                except Exception as e:  # noqa: BLE001 (torch renamed cuda_* to device_*)
                    tables[title] = {"sort": key, "table": f"(no table: {type(e).__name__}: {e})"}
        tops = {}
        for title, attr in (("self_cpu", "self_cpu_time_total"),
                            ("self_device", "self_device_time_total")):
            rows = []
            for e in ka:
                if e.key.startswith(("gpucheck_step_", "ProfilerStep")):
                    continue
                v = getattr(e, attr, None)
                if v is None and attr == "self_device_time_total":
                    v = getattr(e, "self_cuda_time_total", 0)
                if v:
                    rows.append((v, e.key, e.count))
            rows.sort(reverse=True)
            tops[title] = [{"name": k, "us_per_step": round(v / steps, 1), "calls_per_step": round(c / steps, 2)}
                           for v, k, c in rows[:top]]
        per_step = sync_counts(prof.events(), steps)
        mean = {k: round(sum(c.get(k, 0) for c in per_step) / max(1, len(per_step)), 2) for k in SYNC_EVENTS}
        return {"mode": mode, "requests": n, "steps": steps, "prefill_steps": prefill, "warm_steps": warm,
                "step_ms_unprofiled": plain, "step_ms_profiled": prof_steps,
                "mean_ms_unprofiled": round(sum(s["ms"] for s in plain) / len(plain), 3),
                "mean_ms_profiled": round(sum(s["ms"] for s in prof_steps) / len(prof_steps), 3),
                "sync_per_step": per_step, "sync_per_step_mean": mean, "top": tops, "tables": tables,
                "trace": trace_delta(trace_before, trace_after)}

    def syncdebug(self, n: int, steps: int, warm: int, mode: str) -> dict:
        import torch

        eng, ids, step, prefill, _ = self._start_batch(n, mode, f"sync-{mode}-{time.monotonic_ns()}")
        for _ in range(warm):
            step()
        per_step, where = [], collections.Counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    before = len(w)
                    step()
                    per_step.append(len(w) - before)
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode(0)
            for x in w:
                msg = str(x.message)
                if "synchroniz" in msg.lower() or not self.cuda:
                    where[f"{os.path.relpath(x.filename) if x.filename.startswith('/') else x.filename}:{x.lineno}"] += 1
        self._finish(eng, ids)
        return {"mode": mode, "requests": n, "steps": steps, "cuda": self.cuda,
                "warnings_per_step": per_step,
                "mean_per_step": round(sum(per_step) / max(1, len(per_step)), 2),
                "where": [{"at": k, "count": v, "per_step": round(v / steps, 2)} for k, v in where.most_common(12)]}

    def ramp(self, n: int, mode: str) -> dict:
        """Requests with max_tokens 2..n+1: the batch shrinks by one each step, from n to 1.
        Counts the Triton compiles (new entries in this process's TRITON_CACHE_DIR)."""
        cache = os.environ.get("TRITON_CACHE_DIR")
        before = set(os.listdir(cache)) if cache and os.path.isdir(cache) else set()
        t = time.perf_counter()
        eng, ids, step, prefill, ntok = self._start_batch(
            n, mode, f"ramp-{mode}-{time.monotonic_ns()}", per_request_tokens=[2 + i for i in range(n)])
        k = 0
        while eng.has_unfinished_requests() and k < n + 20:
            step()
            k += 1
        dt = time.perf_counter() - t
        after = set(os.listdir(cache)) if cache and os.path.isdir(cache) else set()
        kernels = collections.Counter()
        for d in sorted(after - before):
            names = [f[:-5] for f in os.listdir(os.path.join(cache, d))
                     if f.endswith(".json") and not f.startswith("__grp__")]
            kernels[names[0] if names else d] += 1
        return {"mode": mode, "requests": n, "steps": k + prefill, "seconds": round(dt, 3),
                "triton_cache": cache, "compiles": sum(kernels.values()), "by_kernel": dict(kernels)}

    def trace_summary(self, wait=True):
        path = self.spec.get("trace_path")
        if not path:
            return None
        size, t0 = -1, time.monotonic()
        while wait and time.monotonic() - t0 < 5:  # the writer is off the engine thread: let it drain
            s = os.path.getsize(path) if os.path.exists(path) else 0
            if s == size and s > 0:
                break
            size = s
            time.sleep(0.5)
        if not os.path.exists(path):
            return {"records": 0, "note": f"{path} not written"}
        n, branches, bad = 0, collections.Counter(), 0
        with open(path) as f:
            for ln in f:
                try:
                    r = json.loads(ln)
                except ValueError:
                    bad += 1
                    continue
                n += 1
                branches[r.get("branch")] += 1
        return {"records": n, "branches": dict(branches), "unparsable_lines": bad}


def trace_delta(before, after):
    """The trace records one command added (the file accumulates over the engine's life)."""
    if not after:
        return after
    before = before or {}
    b0 = before.get("branches") or {}
    br = {k: v - b0.get(k, 0) for k, v in (after.get("branches") or {}).items() if v - b0.get(k, 0)}
    return {"records": after.get("records", 0) - before.get("records", 0), "branches": br,
            "records_total": after.get("records", 0)}


SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize",
               "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy",
               "aten::copy_", "aten::nonzero")


def sync_counts(events, n_steps):
    """Per profiled step (its ``gpucheck_step_NN`` window), the CPU-side sync points and
    copies by name."""
    windows = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.name.startswith("gpucheck_step_")
                     and str(getattr(e, "device_type", "CPU")).endswith("CPU"))
    counts = [collections.Counter() for _ in windows]
    for e in events:
        name = e.name
        if name not in SYNC_EVENTS:
            continue
        s = e.time_range.start
        for j, (a, b) in enumerate(windows):
            if a <= s <= b:
                counts[j][name] += 1
                break
    return [dict(c) for c in counts]


# ---------------------------------------------------------------------------
def serve(w: Worker) -> None:
    handlers = {
        "gen": lambda c: w.gen(int(c["conc"]), int(c["tokens"]), c["mode"]),
        "profile": lambda c: w.profile(int(c["conc"]), int(c.get("steps", 16)), int(c.get("warm", 4)), c["mode"]),
        "syncdebug": lambda c: w.syncdebug(int(c["conc"]), int(c.get("steps", 8)), int(c.get("warm", 4)), c["mode"]),
        "ramp": lambda c: w.ramp(int(c["conc"]), c["mode"]),
        "seeded": lambda c: w.seeded(int(c["conc"]), int(c["tokens"]), c.get("mode", "entropix")),
        "info": lambda c: w.describe(),
    }
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
        except ValueError:
            emit({"ev": "result", "id": None, "error": f"bad command line {line[:100]!r}"})
            continue
        op, cid = cmd.get("op"), cmd.get("id")
        if op == "quit":
            emit({"ev": "result", "id": cid, "ok": True})
            break
        t0 = time.monotonic()
        try:
            res = handlers[op](cmd)
            emit({"ev": "result", "id": cid, "op": op, "ok": True, "wall_s": round(time.monotonic() - t0, 2), **res})
        except Exception as e:  # noqa: BLE001 (every failure is a reply)
            traceback.print_exc()
            emit({"ev": "result", "id": cid, "op": op, "ok": False,
                  "error": f"{type(e).__name__}: {str(e)[:600]}", "wall_s": round(time.monotonic() - t0, 2)})


def main(argv) -> int:
    global _PROTO
    _PROTO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # print() and vLLM's logs go to stderr (the engine log)
    sys.stdout = sys.stderr
    spec = json.loads(argv[0] if argv else os.environ["GPUCHECK_SPEC"])
    emit({"ev": "up", "pid": os.getpid(), "id": spec.get("id")})
    w = Worker(spec)
    phase = "build"
    try:
        w.build()
        phase = "warm-up"
        w.warm()
    except BaseException as e:  # noqa: BLE001 (the orchestrator must hear it)
        traceback.print_exc()
        emit({"ev": "error", "phase": phase, "error": f"{type(e).__name__}: {str(e)[:1500]}"})
        sys.stderr.flush()
        os._exit(3)
    emit({"ev": "ready", "info": w.info})
    try:
        serve(w)
    finally:
        sys.stderr.flush()
        # no orderly vLLM shutdown: it can hang; the orchestrator kills the process group
        threading.Timer(5.0, lambda: os._exit(0)).start()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
