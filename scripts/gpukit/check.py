"""The device check's orchestrator (``scripts/gpu_check.sh`` runs it; its header is the manual).

    python check.py --mode full|quick|cpu --budget SECONDS --out DIR [--stages a,b] [--setup VERDICT]

Phases, all inside one time budget (a stage that hangs is killed at its box; the others run):

A. concurrently: every engine worker (``engine_worker.py``, one process group each) builds
   its engine and warms it up; a platform probe (vLLM on the CUDA platform, the plugin
   found and its probe passing); the Triton kernel tests (pytest, time-boxed);
B. the measurements, one at a time, in priority order (the acceptance figures first, then
   coverage), each a timed ``generate`` in one engine: Entropix rows and per-request stock
   rows of one engine back to back in alternating order; plugin-off vs no-plugin engines
   alternately; then the profile, the sync-debug count and the Triton-compile ramp in the
   in-process engine. Jobs that do not fit the time left are skipped (and say so);
C. the engines are stopped; the kernel and sampler benchmarks run with the time left.

Results (``--out``, at most 8 files): ``summary.md`` (verdicts, acceptance figures, tables),
``results.json`` (everything), ``check.log`` (this process's output), ``tests.log``,
``bench.md``, ``profile.txt``, ``engines.log`` (each engine's log tail and key lines);
``gpu_check.sh`` adds ``setup.log``. Both summary files are rewritten after every phase, so a
kill keeps what was done.

``--mode cpu`` is the rehearsal on a machine without a GPU: the same code paths with the
CPU vLLM of the project's ``.venv`` and the bundled model's real weights (float32,
concurrency 1 and 4, few tokens, no CUDA graphs; MRV2 cannot start on CPU: vLLM's refusal
is reported as SKIP).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "engine_worker.py")
GIB = 2 ** 30

# Environment of every engine process. VLLM_USE_FLASHINFER_SAMPLER=0: vLLM's CUDA top-k /
# top-p sampler would import FlashInfer, absent on the device (seen there); so "stock"
# sampling is vLLM's PyTorch/Triton path. VLLM_ALLOW_INSECURE_SERIALIZATION=1: the
# worker's collective_rpc sends a function (reads the runner, sampler and graph mode).
ENGINE_ENV = {
    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
    "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}
# CPU rehearsal: no AOT compile. The KV cache is sized by kv_cache_memory_bytes (what
# VLLM_CPU_KVCACHE_SPACE sets; that variable would override it, so it is removed: None).
# No OpenMP thread binding: several engines bound to the same cores of a small shared machine
# ran 30x slower (an in-process engine: 1.4-2 s per decode step of 4 requests, 48 ms unbound).
CPU_ENV = {"VLLM_USE_AOT_COMPILE": "0", "VLLM_CPU_KVCACHE_SPACE": None, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

MODES = {
    # budget: default seconds for this script; start_box: engines must be ready by then;
    # tests_box: pytest; bench_reserve: kept for phase C while coverage jobs run
    "full": dict(budget=520, start_box=240, tests_box=120, bench_reserve=110, gen_est=12.0,
                 gen_timeout=150, tokens=64, conc=(1, 64, 256)),
    "quick": dict(budget=225, start_box=150, tests_box=60, bench_reserve=0, gen_est=10.0,
                  gen_timeout=100, tokens=48, conc=(1, 64)),
    "cpu": dict(budget=900, start_box=480, tests_box=150, bench_reserve=60, gen_est=20.0,
                gen_timeout=300, tokens=8, conc=(1, 4)),
}

T0 = time.monotonic()
LOG = None


def el() -> float:
    return time.monotonic() - T0


QUIET = False


def say(msg: str) -> None:
    line = f"[check {el():6.1f}s] {msg}"
    if not QUIET:
        print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


# ===========================================================================
# The plan: engines and jobs
# ===========================================================================
def models(mode: str, kit: str) -> dict:
    if mode == "cpu":
        r = subprocess.run([sys.executable, "-m", "entropix_vllm.bundled", "--check"], cwd="/",
                           capture_output=True, text=True)
        d = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None
        if not d:
            raise SystemExit("cpu rehearsal: the bundled model is not built (bash scripts/setup.sh)")
        # small, shared machine: 128 MiB of KV cache, short batches (about 2.5 GB per engine)
        base = dict(model_dir=d, dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8,
                    max_num_batched_tokens=512, vocab=49152, mem={"kv_bytes": 128 * 2 ** 20})
        return {"smol": dict(base, label="SmolLM2-135M (real weights, fp32)"),
                # the Llama shape's path (no tokenizer: token-id prompts, the CoT token an id)
                "tok": dict(base, label="SmolLM2-135M (real weights, fp32), token-id prompts",
                            token_prompts=True, cot_token=4563)}
    common = dict(dtype="bfloat16", load_format="dummy", device="cuda", max_model_len=1024,
                  max_num_seqs=256)
    return {
        "smol": dict(common, model_dir=os.path.join(kit, "model-smollm2"), vocab=49152,
                     label="SmolLM2-135M shape (bf16, dummy weights)",
                     mem={"util": 0.035, "kv_bytes": 1 * GIB}),
        "llama": dict(common, model_dir=os.path.join(HERE, "model-llama8b"), vocab=128256,
                      label="Llama-3-8B shape (bf16, dummy weights, token-id prompts)",
                      token_prompts=True, cot_token=2564,
                      mem={"util": 0.16, "kv_bytes": 5 * GIB}),
    }


def make_plan(mode: str, kit: str, work: str):
    """(engines, jobs). An engine: id, title, spec (engine_worker), env, facts. A job: one
    measurement step, in priority order; ``prio`` "accept" jobs may use the time kept for
    the benchmarks, "cover" jobs may not."""
    cfg = MODES[mode]
    M = models(mode, kit)
    cpu, full = mode == "cpu", mode == "full"
    c1, cmid, chigh = 1, (4 if cpu else 64), 256
    tok = cfg["tokens"]
    wtok = 4 if cpu else 8
    engines = []

    def eng(eid, title, model, *, plugin=True, entropix=False, runner="v1", graphs=False,
            inproc=False, trace=False, concs=(), private_triton=False):
        spec = dict(M[model], id=eid, entropix=entropix, graphs=graphs)
        spec.pop("label", None)
        if graphs:
            spec["capture_sizes"] = [1, 64, 256]
        if trace:
            spec["trace_path"] = os.path.join(work, f"trace_{eid}.jsonl")
        modes = ["entropix", "stock"] if entropix else ["plain"]
        spec["warm"] = [{"conc": c, "tokens": wtok, "modes": modes} for c in concs]
        env = dict(ENGINE_ENV, **(CPU_ENV if cpu else {}))
        # runner "default": VLLM_USE_V2_MODEL_RUNNER unset, vLLM's (and the plugin's) choice
        env["VLLM_USE_V2_MODEL_RUNNER"] = {"v2": "1", "v1": "0"}.get(runner)
        env["VLLM_PLUGINS"] = "entropix" if plugin else ""
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if inproc else "1"
        env["VLLM_PORT"] = str(41000 + 150 * len(engines))
        if private_triton:
            env["TRITON_CACHE_DIR"] = os.path.join(work, f"triton_{eid}")
        engines.append({
            "id": eid, "title": title, "model": model, "model_label": M[model]["label"],
            "plugin": plugin, "entropix": entropix, "runner": runner, "graphs": graphs,
            "inproc": inproc, "spec": spec, "env": env})

    eng("plain", "no plugin (VLLM_PLUGINS=\"\")", "smol", plugin=False, concs=(cmid,))
    if not cpu:  # the CPU rehearsal keeps to three engines on its small shared machine
        eng("off", "plugin loaded, sampler off", "smol", concs=(cmid,))
    if cpu:
        eng("ent", "Entropix, MRV1, eager; token-id prompts (the Llama shape's path)", "tok",
            entropix=True, concs=(c1, cmid))
        eng("ent2", "Entropix, MRV2, eager", "smol", entropix=True, runner="v2", concs=(c1, cmid))
    else:
        eng("ent", "Entropix, MRV1, eager", "smol", entropix=True,
            concs=(c1, cmid, chigh) if full else (c1, cmid))
        eng("ent2", "Entropix, MRV2, eager", "smol", entropix=True, runner="v2",
            concs=(c1, cmid, chigh) if full else (cmid,))
        eng("lent", "Entropix, MRV1, eager", "llama", entropix=True,
            concs=(cmid, chigh, c1) if full else (cmid, chigh))
        if full:
            eng("lent2", "Entropix, MRV2, eager", "llama", entropix=True, runner="v2", concs=(cmid, chigh))
        eng("g1", "Entropix, MRV1, full CUDA graphs", "smol", entropix=True, graphs=True,
            concs=(c1, cmid) if full else (c1,))
        if full:
            eng("goff", "plugin loaded, sampler off, full CUDA graphs", "smol", graphs=True, concs=(c1, cmid))
            eng("g2", "Entropix, MRV2, full CUDA graphs", "smol", entropix=True, runner="v2", graphs=True,
                concs=(c1, cmid))
            eng("lg1", "Entropix, MRV1, full CUDA graphs", "llama", entropix=True, graphs=True,
                concs=(c1, cmid))
    if full:
        eng("entd", "Entropix, runner left to vLLM and the plugin (VLLM_USE_V2_MODEL_RUNNER unset), eager",
            "smol", entropix=True, runner="default", concs=(cmid,))
    eng("prof", "Entropix, MRV1, eager, engine core in-process, trace on", "smol", entropix=True,
        inproc=True, trace=True, concs=(cmid,), private_triton=not cpu)
    have = {e["id"] for e in engines}
    # a timed call only where its engine warmed up at that concurrency (no JIT in a timing)
    warmed = {e["id"]: {w["conc"] for w in e["spec"]["warm"]} for e in engines}

    jobs = []

    def pair(e, conc, rep, prio="accept"):
        if e in have and conc in warmed[e]:
            jobs.append({"kind": "pair", "engine": e, "conc": conc, "tokens": tok, "rep": rep, "prio": prio})

    def cross(a, b, conc, rep, prio="accept", modes=("plain", "plain")):
        if a in have and b in have and conc in warmed[a] and conc in warmed[b]:
            jobs.append({"kind": "cross", "engines": [a, b], "modes": list(modes), "conc": conc,
                         "tokens": tok, "rep": rep, "prio": prio})

    def same(a, b, prio="accept"):  # seeded Entropix requests: the same ids on both engines
        if a in have and b in have:
            jobs.append({"kind": "same", "engines": [a, b], "conc": 4 if cpu else 8,
                         "tokens": 8 if cpu else 24, "prio": prio})

    def cmd(kind, e, prio="accept", **kw):
        if e in have:
            jobs.append({"kind": kind, "engine": e, "prio": prio, **kw})

    pcfg = dict(conc=cmid, steps=4 if cpu else (16 if full else 8), warm=2 if cpu else 4)
    scfg = dict(conc=cmid, steps=3 if cpu else 8, warm=1 if cpu else 4)
    # round 1: one figure of each acceptance line
    pair("lent", cmid, 0)
    pair("lent", chigh, 0)
    pair("ent", cmid, 0)
    cross("plain", "off", cmid, 0)
    if cpu:  # the cross-engine path: no plugin vs an Entropix engine's stock rows, alternately
        cross("plain", "ent", cmid, 0, modes=("plain", "stock"))
    pair("ent2", cmid, 0)
    pair("g1", c1, 0)
    cross("g1", "goff", c1, 0, modes=("entropix", "plain"))
    pair("lent2", cmid, 0)
    for m in ("entropix", "stock"):
        cmd("profile", "prof", mode=m, **pcfg)
    for m in ("entropix", "stock"):
        cmd("syncdebug", "prof", mode=m, **scfg)
    # Triton compiles while the batch shrinks (kernel names tell Entropix's from vLLM's)
    if mode != "quick":
        cmd("ramp", "prof", mode="entropix", conc=cmid)
    # round 2: the second run of each (the other order)
    pair("lent", cmid, 1)
    pair("lent", chigh, 1)
    pair("ent", cmid, 1)
    cross("plain", "off", cmid, 1)
    if cpu:
        cross("plain", "ent", cmid, 1, modes=("plain", "stock"))
    pair("ent2", cmid, 1)
    pair("g1", c1, 1)
    cross("g1", "goff", c1, 1, modes=("entropix", "plain"))
    pair("lent2", chigh, 0)
    same("ent", "ent")   # seeded requests repeat on one engine
    same("ent", "ent2")  # ... and give the same tokens under MRV1 and MRV2 (issue 18)
    if cpu:
        pair("ent", c1, 0)
        pair("ent", c1, 1)
    # round 3: coverage
    if mode == "quick":
        cmd("ramp", "prof", prio="cover", mode="entropix", conc=cmid)
    cmd("ramp", "prof", prio="cover", mode="stock", conc=cmid)
    cross("plain", "off", cmid, 2, prio="cover")
    if not cpu:
        pair("ent", c1, 0, prio="cover")
        pair("ent2", c1, 0, prio="cover")
        pair("ent", chigh, 0, prio="cover")
        pair("ent2", chigh, 0, prio="cover")
    pair("g2", c1, 0, prio="cover")
    pair("lg1", c1, 0, prio="cover")
    pair("g1", cmid, 0, prio="cover")
    cross("g1", "goff", cmid, 0, prio="cover", modes=("entropix", "plain"))
    pair("g2", cmid, 0, prio="cover")
    pair("lg1", cmid, 0, prio="cover")
    pair("lent", c1, 0, prio="cover")
    pair("entd", cmid, 0, prio="cover")
    if not cpu:
        pair("ent", c1, 1, prio="cover")
    pair("g2", c1, 1, prio="cover")
    pair("lg1", c1, 1, prio="cover")
    return engines, jobs


def plan_text(mode, kit, work) -> str:
    engines, jobs = make_plan(mode, kit, work)
    cfg = MODES[mode]
    L = [f"mode {mode}: budget {cfg['budget']} s for check.py, engines ready within {cfg['start_box']} s, "
         f"kernel tests boxed at {cfg['tests_box']} s, {cfg['bench_reserve']} s kept for the benchmarks",
         f"{len(engines)} engines (started together):"]
    for e in engines:
        sp = e["spec"]
        L.append(f"  {e['id']:6s} {e['title']}; {e['model_label']}; warm-up at {[w['conc'] for w in sp['warm']]}; "
                 f"{ {k: v for k, v in e['env'].items() if k in ('VLLM_USE_V2_MODEL_RUNNER', 'VLLM_PLUGINS', 'VLLM_ENABLE_V1_MULTIPROCESSING')} }"
                 + (f"; KV {sp['mem']['kv_bytes'] / GIB:g} GiB" if sp.get("mem") else ""))
    L.append(f"{len(jobs)} jobs, in this order (accept: may use the benchmarks' time; cover: may not):")
    for j in jobs:
        who = j.get("engine") or "/".join(j["engines"])
        L.append(f"  {j['prio']:6s} {j['kind']:9s} {who:10s} conc {j.get('conc')}"
                 + (f" x {j['tokens']} tokens, rep {j['rep']}" if "tokens" in j else f", {j.get('mode')}"))
    return "\n".join(L)


# ===========================================================================
# Engine workers
# ===========================================================================
class Engine:
    def __init__(self, d: dict, py: list, work: str, pythonpath: str | None):
        self.__dict__.update(d)
        self.py, self.work = py, work
        self.log_path = os.path.join(work, f"engine_{self.id}.log")
        self.q: queue.Queue = queue.Queue()
        self.proc = None
        self.state = "new"      # starting, ready, failed, dead, stopped
        self.error = None
        self.phase = None
        self.info = {}
        self.t_start = self.t_ready = None
        self.next_id = 0
        self.pythonpath = pythonpath

    def start(self):
        env = dict(os.environ)
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if self.pythonpath is not None:
            env["PYTHONPATH"] = self.pythonpath
        env.pop("GPUCHECK_SPEC", None)
        self.logf = open(self.log_path, "w", buffering=1)
        self.logf.write(f"== engine {self.id}: {self.title}; env "
                        f"{ {k: v for k, v in self.env.items() if k.startswith('VLLM_')} }\n")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(self.py + [WORKER, json.dumps(self.spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.logf, env=env, cwd=self.work,
                                     start_new_session=True, text=True, bufsize=1)
        self.state = "starting"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                try:
                    self.q.put(json.loads(line[3:]))
                except ValueError:
                    pass
        self.q.put({"ev": "eof"})

    def poll_start(self) -> bool:
        """Consumes start-up events; True once settled (ready or failed)."""
        while True:
            try:
                ev = self.q.get_nowait()
            except queue.Empty:
                return self.state != "starting"
            if ev["ev"] == "ready":
                self.state, self.info = "ready", ev.get("info", {})
                self.t_ready = time.monotonic()
            elif ev["ev"] == "error":
                self.state, self.phase, self.error = "failed", ev.get("phase"), ev.get("error")
            elif ev["ev"] == "eof" and self.state == "starting":
                self.state, self.error = "failed", f"the worker exited (code {self.proc.wait()}) before it was ready"

    def ask(self, cmd: dict, timeout: float) -> dict:
        if self.state != "ready":
            return {"ok": False, "error": f"engine {self.id} is {self.state}"}
        self.next_id += 1
        cmd = dict(cmd, id=self.next_id)
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self.state, self.error = "dead", f"the worker's stdin is closed: {e}"
            return {"ok": False, "error": self.error}
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                self.kill()
                self.state = "dead"
                self.error = f"no answer to {cmd['op']} within {timeout:.0f} s: killed"
                return {"ok": False, "error": self.error, "timed_out": True}
            try:
                ev = self.q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if ev["ev"] == "eof":
                self.state = "dead"
                self.error = f"the worker died during {cmd['op']} (exit code {self.proc.poll()})"
                return {"ok": False, "error": self.error}
            if ev["ev"] == "result" and ev.get("id") == cmd["id"]:
                return ev

    def kill(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def send_quit(self):
        if self.state == "ready":
            try:
                self.proc.stdin.write(json.dumps({"op": "quit", "id": -1}) + "\n")
                self.proc.stdin.flush()
            except Exception:  # noqa: BLE001 (killed afterwards anyway)
                pass

    def log_excerpt(self, n_key=20, n_tail=12) -> dict:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return {"key": [], "tail": []}
        keyre = re.compile(r"Error|Exception|Traceback|raise |FAILED|Entropix|cudagraph|CUDA graph|"
                           r"Model Runner|model runner|KV cache|Capturing", re.I)
        key = [ln for ln in lines if keyre.search(ln)]
        return {"key": [ln[:400] for ln in key[-n_key:]], "tail": [ln[:400] for ln in lines[-n_tail:]]}

    GENERIC = ("see root cause above", "Engine core initialization failed",
               "WorkerProc initialization failed", "See stack trace for root cause")

    def root_cause(self) -> str | None:
        """The first specific error line of the last traceback(s) in the engine log: the
        worker's or engine core's exception, which the front end reports only as 'see root
        cause above'. vLLM prefixes such lines with '(Worker pid=N) ERROR date [file:line]'."""
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()[-400:]
        except OSError:
            return None
        pat = re.compile(r"^\s*(\([\w:-]+ pid=\d+\)\s*)?(ERROR [\d-]+ [\d:.]+ \[[^\]]*\]\s*)?"
                         r"([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)): (.+)$")
        for ln in lines:
            m = pat.match(ln)
            if m and not any(g in m.group(5) for g in self.GENERIC):
                return f"{m.group(3)}: {m.group(5)}"[:600]
        return None


# ===========================================================================
# Subprocess stages (tests, benchmarks, platform probe)
# ===========================================================================
def run_boxed(cmd, box, log_path=None, env=None, cwd=PROJECT, append_header=None):
    """Runs cmd in its own process group, killed at ``box`` seconds. Returns (rc, seconds,
    output, timed_out)."""
    t0 = time.monotonic()
    out_f = open(log_path, "a") if log_path else None
    if out_f and append_header:
        out_f.write(append_header + "\n")
        out_f.flush()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                         start_new_session=True, text=True, errors="replace")
    chunks = []

    def pump():
        for ln in p.stdout:
            chunks.append(ln)
            if out_f:
                out_f.write(ln)
                out_f.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    timed_out = False
    try:
        p.wait(timeout=max(1.0, box))
    except subprocess.TimeoutExpired:
        timed_out = True
    try:
        os.killpg(p.pid, signal.SIGKILL)  # what it left behind goes too
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()
    th.join(timeout=5)
    if out_f:
        out_f.close()
    return p.returncode, time.monotonic() - t0, "".join(chunks), timed_out


PLATFORM_PROBE = r'''
import json, os, sys, time
t0 = time.time()
res = {}
try:
    import torch, triton
    res.update(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
               cuda_available=torch.cuda.is_available(),
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               python=sys.version.split()[0])
    import importlib.metadata as md
    import vllm
    res["vllm"] = vllm.__version__
    res["vllm_file"] = vllm.__file__
    res["vllm_dist_version"] = md.version("vllm")
    from vllm.platforms import current_platform
    res["platform"] = type(current_platform).__name__
    # is_cuda(), not the class name: on the device the platform is NvmlCudaPlatform (a
    # CudaPlatform subclass), which a name check wrongly refused
    res["is_cuda"] = bool(current_platform.is_cuda())
    res["is_cpu"] = bool(current_platform.is_cpu())
    from vllm.plugins import load_plugins_by_group
    res["general_plugins"] = sorted(load_plugins_by_group("vllm.general_plugins"))
    import importlib
    from entropix_vllm.integration import plugin
    # the start-up probe (vllm_source.probe; vllm_api.probe before the #18 redesign)
    for mod in ("entropix_vllm.integration.vllm_source", "entropix_vllm.integration.vllm_api"):
        try:
            probe = getattr(importlib.import_module(mod), "probe")
            break
        except (ImportError, AttributeError):
            probe = None
    if probe is None:
        raise RuntimeError("no probe() in entropix_vllm.integration.vllm_source or vllm_api")
    p = probe()
    res["probe"] = f"{probe.__module__}.probe"
    res["probe_ok"], res["probe_problems"] = p.ok, list(p.problems)[:5]
    res["plugin_active"] = bool(plugin.register())
    import entropix_vllm
    res["entropix_file"] = entropix_vllm.__file__
    mods = ["vllm.v1.worker.gpu_model_runner", "vllm.v1.attention.backends.triton_attn",
            "vllm.v1.sample.sampler"] + (["vllm.v1.worker.gpu.model_runner"] if res["is_cuda"] else [])
    for m in mods:
        importlib.import_module(m)
    res["imported"] = mods
except BaseException as e:
    import traceback
    traceback.print_exc()
    res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
res["seconds"] = round(time.time() - t0, 1)
print("@@ " + json.dumps(res), flush=True)
'''


# ===========================================================================
# The check
# ===========================================================================
class Check:
    def __init__(self, a):
        self.a = a
        self.mode = a.mode
        self.cfg = dict(MODES[a.mode])
        self.budget = float(a.budget or self.cfg["budget"])
        self.deadline = T0 + self.budget
        self.out, self.work = a.out, a.work
        self.py = (a.python or sys.executable).split()
        self.pythonpath = os.environ.get("PYTHONPATH")
        self.cpu = a.mode == "cpu"
        self.stages = collections.OrderedDict()   # name -> {verdict, detail, seconds, ...}
        self.measurements = []
        self.commands = []                         # profile / syncdebug / ramp results
        self.figures = []
        self.bench = {}
        self.meta = {"mode": a.mode, "budget_s": self.budget, "started_utc": time.strftime(
            "%Y-%m-%d %H:%M:%S", time.gmtime()), "commit": a.commit, "command": a.command,
            "setup": a.setup}
        self.only = set(a.stages.split(",")) if a.stages else None
        self.engines = []
        self.jobs = []
        self.tests_thread = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def want(self, name: str) -> bool:
        return self.only is None or name in self.only or name.split(":")[0] in self.only

    def verdict(self, stage, verdict, detail="", seconds=None, **extra):
        detail = re.sub(r"\s+", " ", str(detail)).strip()
        self.stages[stage] = {"verdict": verdict, "detail": detail,
                              "seconds": None if seconds is None else round(seconds, 1), **extra}
        say(f"CHECK {stage} {verdict} {detail}" + (f" [{seconds:.0f} s]" if seconds is not None else ""))

    # -- phase A -------------------------------------------------------------
    def start_engines(self):
        engines, jobs = make_plan(self.mode, self.a.kit, self.work)
        if not self.want("engines"):
            engines, jobs = [], []
        self.engines = [Engine(e, self.py, self.work, self.pythonpath) for e in engines]
        self.jobs = jobs
        for e in self.engines:
            e.start()
        if self.engines:
            say(f"started {len(self.engines)} engine workers: {', '.join(e.id for e in self.engines)} "
                f"(logs in {self.work}/engine_*.log)")

    def platform_probe(self):
        if not self.want("platform"):
            return
        env = dict(os.environ, **ENGINE_ENV)
        rc, secs, out, to = run_boxed(self.py + ["-c", PLATFORM_PROBE], min(300 if self.cpu else 120, self.left() - 10),
                                      env=env, cwd=self.work)
        res = {}
        for ln in out.splitlines():
            if ln.startswith("@@ "):
                res = json.loads(ln[3:])
        self.meta["platform"] = res
        problems = []
        if to:
            problems.append("timed out")
        if res.get("error"):
            problems.append(res["error"])
        if not self.cpu and not res.get("is_cuda"):
            problems.append(f"platform is {res.get('platform')}, not a CUDA platform")
        if self.cpu and not res.get("is_cpu"):
            problems.append(f"platform is {res.get('platform')}, expected the CPU platform")
        if "entropix" not in res.get("general_plugins", []):
            problems.append("entropix not found by vLLM's plugin loader")
        if not res.get("probe_ok"):
            problems.append(f"probe failed: {res.get('probe_problems')}")
        if not res.get("plugin_active"):
            problems.append("plugin.register() did not activate")
        if problems:
            self.verdict("platform", "FAIL", "; ".join(str(p) for p in problems)[:600], secs)
        else:
            self.verdict("platform", "PASS",
                         f"vllm {res.get('vllm')} ({res.get('platform')}), torch {res.get('torch')}, "
                         f"triton {res.get('triton')}, device {res.get('device') or 'cpu'}; entropix "
                         f"found by vLLM's loader, probe ok, active", secs)

    def test_files(self):
        if self.a.tests:
            return self.a.tests.split()
        if self.cpu:
            return ["tests/kernels/test_contract.py"]
        import glob

        # found anywhere under tests/ (the suite is moving into layer folders)
        pats = ["test_triton_logit_stats.py", "test_candidate_sampling.py", "test_decide.py",
                "test_triton_attn_stats.py", "test_*launch*.py", "test_*recompil*.py", "test_*graph*.py"]
        seen = []
        for pat in pats:
            for f in sorted(glob.glob(os.path.join(PROJECT, "tests", "**", pat), recursive=True)):
                rel = os.path.relpath(f, PROJECT)
                if rel not in seen:
                    seen.append(rel)
        return seen

    def run_tests(self):
        if not self.want("tests"):
            return
        files = self.test_files()
        box = min(self.cfg["tests_box"], self.left() - 30)
        cmd = self.py + ["-P", "-m", "pytest", "-v", "-x", "-p", "no:cacheprovider", "-o", "addopts="]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        probe = subprocess.run(self.py + ["-c", "import xdist, pytest_timeout"], capture_output=True, env=env)
        if probe.returncode == 0:
            cmd += ["--timeout", "120"] + ([] if self.cpu else ["-n", "4"])
        cmd += files
        log = os.path.join(self.out, "tests.log")
        rc, secs, out, to = run_boxed(cmd, box, log_path=log, env=env,
                                      append_header=f"$ {' '.join(cmd)}   (box {box:.0f} s)")
        passed = len(re.findall(r"\bPASSED\b", out))
        failed = len(re.findall(r"\b(FAILED|ERROR)\b", out))
        skipped = len(re.findall(r"\bSKIPPED\b", out))
        last = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed)|no tests ran|error", ln)]
        tail = last[-1].strip("= ") if last else ""
        detail = f"{passed} passed, {failed} failed, {skipped} skipped ({len(files)} files)"
        if to:
            self.verdict("tests", "TIMEOUT", f"killed at its {box:.0f} s box after {detail}", secs)
        elif rc == 0:
            self.verdict("tests", "PASS", f"{detail}; {tail}", secs)
        else:
            first_fail = next((ln for ln in out.splitlines() if re.search(r"\b(FAILED|ERROR)\b", ln)), "")
            self.verdict("tests", "FAIL", f"exit {rc}: {detail}; first: {first_fail.strip()[:200]}", secs)

    def phase_a(self):
        say(f"phase A: engines start, platform probe, kernel tests (budget left {self.left():.0f} s)")
        self.start_engines()
        self.tests_thread = threading.Thread(target=lambda: (self.platform_probe(), self.run_tests()),
                                             daemon=True)
        self.tests_thread.start()
        end = min(time.monotonic() + self.cfg["start_box"], self.deadline - 60)
        pending = list(self.engines)
        while pending and time.monotonic() < end:
            for e in list(pending):
                if e.poll_start():
                    pending.remove(e)
                    self.report_start(e)
            time.sleep(0.5)
        for e in pending:
            e.kill()
            e.state, e.error = "failed", f"not ready within {time.monotonic() - e.t_start:.0f} s: killed"
            self.report_start(e)
        self.tests_thread.join(timeout=max(0.0, self.deadline - 40 - time.monotonic()))
        self.write()

    def report_start(self, e):
        secs = (e.t_ready or time.monotonic()) - e.t_start
        name = f"engine:{e.id}"
        if e.state == "ready":
            info = e.info
            eng = info.get("engine", {})
            gm = eng.get("cudagraph_mode", info.get("front_end_cudagraph_mode"))
            problems = self.engine_problems(e)
            detail = (f"{e.model}: {e.title}; up {info.get('engine_up_s')} s + warm-up {info.get('warm_s')} s; "
                      f"runner {short(eng.get('runner'))}, sampler {short(eng.get('sampler'))}, cudagraph_mode {gm}")
            if problems:
                self.verdict(name, "FAIL", detail + "; " + "; ".join(problems), secs)
            else:
                self.verdict(name, "PASS", detail, secs)
        else:
            cause = clean_error(e.root_cause() or "")
            err = clean_error(e.error)
            extra = cause and cause not in err and "validation error for" not in cause
            msg = f"{e.title}: {e.phase or 'start'}: {err}" + (f"; root cause: {cause}" if extra else "")
            if self.cpu and e.runner == "v2" and re.search(r"triton|V2|v2", f"{e.error} {cause}", re.I):
                self.verdict(name, "SKIP", "MRV2 cannot start on CPU (expected); vLLM said: " + msg[:500], secs)
            else:
                self.verdict(name, "FAIL", msg[:900], secs)

    def engine_problems(self, e) -> list:
        """What the engine reports that contradicts its spec (the runner, the sampler, the plugin)."""
        eng = e.info.get("engine") or {}
        out = []
        if not eng:
            return [f"engine description unavailable ({e.info.get('engine_rpc_error')})"]
        runner, sampler = eng.get("runner") or "", eng.get("sampler") or ""
        if e.runner == "v2" and ".gpu.model_runner" not in runner and ".cpu.model_runner" not in runner:
            out.append(f"asked for MRV2, runs {runner}")
        if e.runner == "v1" and (".gpu.model_runner" in runner or "worker.cpu.model_runner" in runner):
            out.append(f"asked for MRV1, runs {runner}")
        if e.entropix and "entropix" not in sampler:
            out.append(f"Entropix engine without the Entropix sampler ({sampler})")
        if not e.plugin and "entropix" in sampler:
            out.append(f"the Entropix sampler in an engine without the plugin ({sampler})")
        if e.plugin != bool(eng.get("plugin_loaded")):
            out.append(f"plugin loaded in the worker: {eng.get('plugin_loaded')} (expected {e.plugin})")
        return out

    # -- phase B -------------------------------------------------------------
    def est(self, eng_id, conc, mode, tokens=None) -> float:
        """Seconds one timed call should take: the slowest earlier run of it, else its
        warm-up (a few tokens) scaled to the call's tokens, else the mode's default."""
        xs = [m["seconds"] for m in self.measurements
              if m["engine"] == eng_id and m["conc"] == conc and m["mode"] == mode and m.get("ok")]
        if xs:
            return max(xs)
        e = self.by_id(eng_id)
        for w in ((e.info or {}).get("warm") or []) if e else []:
            if w["conc"] == conc and w["mode"] == mode and w.get("seconds"):
                return 2.0 + w["seconds"] * (tokens or self.cfg["tokens"]) / max(1, w["tokens"])
        return self.cfg["gen_est"]

    def gen(self, e: Engine, conc, tokens, mode, job, rep):
        # a hang costs at most a few times the expected time (never past the budget)
        timeout = min(self.cfg["gen_timeout"], 30 + 4 * self.est(e.id, conc, mode, tokens),
                      max(10.0, self.left() - 15))
        r = e.ask({"op": "gen", "conc": conc, "tokens": tokens, "mode": mode}, timeout)
        m = {"engine": e.id, "conc": conc, "tokens_per_request": tokens, "mode": mode, "rep": rep,
             "job": job, "ok": bool(r.get("ok")) and r.get("complete", False)}
        for k in ("tok_s", "seconds", "tokens", "requests", "complete", "top_token", "top_token_share",
                  "error"):
            if k in r:
                m[k] = r[k]
        if r.get("ok") and not r.get("complete"):
            m["error"] = f"incomplete: {r.get('tokens')} of {conc * tokens} tokens"
        self.measurements.append(m)
        say(f"  {e.id} conc {conc} x {tokens} {mode}: "
            + (f"{m.get('tok_s')} tok/s ({m.get('seconds')} s)" if m["ok"] else f"FAILED {m.get('error')}"))
        return m

    def by_id(self, eid):
        return next((e for e in self.engines if e.id == eid), None)

    def phase_b(self):
        say(f"phase B: {len(self.jobs)} measurement jobs (budget left {self.left():.0f} s)")
        reserve_end = 25
        for j, job in enumerate(self.jobs):
            ids = job.get("engines") or [job["engine"]]
            engs = [self.by_id(i) for i in ids]
            if any(e is None or e.state != "ready" for e in engs):
                continue  # the engine's own verdict says why
            if job["kind"] == "pair":
                modes = ["entropix", "stock"] if job["rep"] % 2 == 0 else ["stock", "entropix"]
                need = sum(self.est(ids[0], job["conc"], m, job["tokens"]) for m in modes)
            elif job["kind"] == "cross":
                need = sum(self.est(i, job["conc"], m, job["tokens"]) for i, m in zip(ids, job["modes"]))
            elif job["kind"] == "same":
                need = sum(self.est(i, job["conc"], "entropix", job["tokens"]) for i in ids)
            else:
                need = {"profile": 45.0, "syncdebug": 15.0, "ramp": 60.0}[job["kind"]] * (0.5 if self.cpu else 1)
            keep = reserve_end + (self.cfg["bench_reserve"] if job["prio"] == "cover" else 0)
            if self.left() - keep < need:
                job["skipped"] = f"budget: {self.left():.0f} s left, {need:.0f} s needed + {keep} s kept"
                continue
            job["ran"] = True
            if job["kind"] == "pair":
                e = engs[0]
                for m in modes:
                    self.gen(e, job["conc"], job["tokens"], m, j, job["rep"])
            elif job["kind"] == "cross":
                pairs = list(zip(engs, job["modes"]))
                if job["rep"] % 2 == 1:
                    pairs.reverse()
                for e, m in pairs:
                    self.gen(e, job["conc"], job["tokens"], m, j, job["rep"])
            elif job["kind"] == "same":
                self.same_tokens(engs, job)
            else:
                e = engs[0]
                box = ({"profile": 240, "syncdebug": 240, "ramp": 240} if self.cpu else
                       {"profile": 150, "syncdebug": 90, "ramp": 180})[job["kind"]]
                timeout = min(box, self.left() - 15)
                cmd = {k: v for k, v in job.items() if k not in ("kind", "engine", "prio", "ran")}
                r = e.ask(dict(cmd, op=job["kind"]), timeout)
                r["kind"] = job["kind"]
                r["engine"] = e.id
                self.commands.append(r)
                say(f"  {e.id} {job['kind']} {job.get('mode')}: " + ("ok" if r.get("ok") else f"FAILED {r.get('error')}")
                    + (f", {r.get('wall_s')} s" if r.get("wall_s") else ""))
            self.write()  # after every job: a kill keeps what was measured
        skipped = [jb for jb in self.jobs if jb.get("skipped")]
        if skipped:
            say(f"{len(skipped)} jobs skipped for the budget: "
                + ", ".join(f"{jb['kind']}:{jb.get('engine') or '/'.join(jb['engines'])}@{jb.get('conc')}" for jb in skipped))
        self.figures_and_verdicts()
        self.write()

    def same_tokens(self, engs, job):
        """One seeded call on each engine; the ids compared request by request."""
        ids, errors = [], []
        for e in engs:
            timeout = min(self.cfg["gen_timeout"], max(10.0, self.left() - 15))
            r = e.ask({"op": "seeded", "conc": job["conc"], "tokens": job["tokens"]}, timeout)
            ids.append(r.get("ids") if r.get("ok") else None)
            if not r.get("ok"):
                errors.append(f"{e.id}: {r.get('error')}")
        res = {"kind": "same", "engines": [e.id for e in engs], "conc": job["conc"],
               "tokens": job["tokens"], "ok": not errors}
        if errors:
            res["error"] = "; ".join(errors)
        else:
            a, b = ids
            res["identical"] = sum(x == y for x, y in zip(a, b))
            res["requests"] = len(a)
            # (request, token index) of the first difference, None when all are identical
            res["first_difference"] = next(
                ((i, next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))))
                 for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        self.commands.append(res)
        say(f"  same seeds {'/'.join(res['engines'])} conc {job['conc']} x {job['tokens']}: "
            + (f"{res['identical']} of {res['requests']} requests identical" if res["ok"]
               else f"FAILED {res['error']}"))

    # -- figures ---------------------------------------------------------------
    def best(self, eid, conc, mode):
        xs = [m["tok_s"] for m in self.measurements
              if m["engine"] == eid and m["conc"] == conc and m["mode"] == mode and m.get("ok")]
        return (max(xs), len(xs)) if xs else (None, 0)

    def ratio(self, a, b):
        (x, nx), (y, ny) = self.best(*a), self.best(*b)
        if not x or not y:
            return None, nx, ny
        return round(x / y, 3), nx, ny

    def figures_and_verdicts(self):
        cpu = self.cpu
        cmid = 4 if cpu else 64
        hi = 1 if cpu else 256
        F = []

        def fig(key, title, a, b, target, need=None):
            r, na, nb = self.ratio(a, b)
            note = None
            if need:
                note = need()
            if r is None:
                missing = list({x[0]: x for x, n in ((a, na), (b, nb)) if not n}.values())
                why = []
                for eid, _, _ in dict.fromkeys(missing):
                    e = self.by_id(eid)
                    cpu_why = {"lent": "not on CPU (no Llama shape; its token-id path runs in engine ent)",
                               "off": "not on CPU (three engines there; the cross-engine path runs plain vs ent's stock rows)"}
                    why.append(f"{eid}: " + ((cpu_why.get(eid, "not on CPU") if cpu else "not in this mode's plan")
                                             if e is None else
                                             (e.state + (f" ({e.error})" if e.error else "")
                                              if e.state != "ready" else "no successful run (budget or failures)")))
                v = "SKIP" if all(self.by_id(x[0]) is None for x in missing) else "FAIL"
                F.append({"key": key, "figure": title, "value": None, "target": target, "verdict": v,
                          "note": "; ".join(why)[:500]})
                return
            met = r >= target
            verdict = "MET" if met else "NOT MET"
            if note:
                verdict = "NOT MET" if note.startswith("!") else verdict
            F.append({"key": key, "figure": title, "value": r, "target": target, "verdict": verdict,
                      "runs": f"{na}+{nb}", "a": self.best(*a)[0], "b": self.best(*b)[0],
                      "note": (note or "").lstrip("!")})

        lbl = "Llama-3-8B shape"
        fig("llama_mid", f"{lbl}, MRV1 eager: Entropix / stock rows at {cmid}", ("lent", cmid, "entropix"),
            ("lent", cmid, "stock"), 0.9)
        fig("llama_hi", f"{lbl}, MRV1 eager: Entropix / stock rows at {hi}", ("lent", hi, "entropix"),
            ("lent", hi, "stock"), 0.9)
        fig("smol_mid", f"SmolLM2 shape, MRV1 eager: Entropix / stock rows at {cmid}", ("ent", cmid, "entropix"),
            ("ent", cmid, "stock"), 0.8)
        fig("plugin_off", f"plugin loaded, sampler off / no plugin, SmolLM2, at {cmid}", ("off", cmid, "plain"),
            ("plain", cmid, "plain"), 0.98)

        def graphs_kept():
            e = self.by_id("g1")
            mode = (e.info.get("engine") or {}).get("cudagraph_mode") if e and e.info else None
            if mode != "FULL_DECODE_ONLY":
                return f"!the Entropix engine's cudagraph_mode is {mode}, not FULL_DECODE_ONLY: graphs not kept"
            return "cudagraph_mode FULL_DECODE_ONLY kept"

        if cpu:
            F.append({"key": "graphs_c1", "figure": "full CUDA graphs kept: Entropix / stock rows at 1",
                      "value": None, "target": 0.8, "verdict": "SKIP", "note": "no CUDA graphs on CPU"})
        else:
            fig("graphs_c1", "full CUDA graphs kept (SmolLM2, MRV1): Entropix / stock rows at 1",
                ("g1", 1, "entropix"), ("g1", 1, "stock"), 0.8, need=graphs_kept)
            fig("graphs_engines_c1", "Entropix engine with graphs / plugin-off engine with graphs at 1 (SmolLM2, MRV1)",
                ("g1", 1, "entropix"), ("goff", 1, "plain"), 0.8)
        # MRV2 passes the same stages
        e2 = self.by_id("ent2")
        if e2 is None:
            F.append({"key": "mrv2", "figure": "MRV2 Entropix engine passes the same stages", "value": None,
                      "target": "PASS", "verdict": "SKIP", "note": "not in the plan"})
        else:
            runs = [m for m in self.measurements if m["engine"] in ("ent2", "lent2", "g2")]
            bad = [m for m in runs if not m.get("ok")]
            st = self.stages.get("engine:ent2", {}).get("verdict")
            r, _, _ = self.ratio(("ent2", cmid, "entropix"), ("ent2", cmid, "stock"))
            if st == "SKIP":
                v, note = "SKIP", self.stages["engine:ent2"]["detail"][:300]
            elif st != "PASS":
                v, note = "NOT MET", f"engine ent2: {self.stages.get('engine:ent2', {}).get('detail', 'not started')[:300]}"
            elif bad or not runs:
                v, note = "NOT MET", f"{len(bad)} of {len(runs)} MRV2 runs failed: {bad[0].get('error') if bad else 'none ran'}"
            else:
                v, note = "MET", f"{len(runs)} MRV2 runs ok; Entropix / stock rows at {cmid}: {r}"
            F.append({"key": "mrv2", "figure": "MRV2 Entropix engine passes the same stages", "value": r,
                      "target": "PASS", "verdict": v, "note": note})
        self.figures = F
        for f in F:
            say(f"FIGURE {f['key']}: {f['figure']}: {f['value']} (target {f['target']}) {f['verdict']}"
                + (f" - {f['note']}" if f.get("note") else ""))
        # stage verdicts for the measurement commands
        if self.want("engines"):
            meas_ok = [m for m in self.measurements if m.get("ok")]
            bad = [m for m in self.measurements if not m.get("ok")]
            skipped = [jb for jb in self.jobs if jb.get("skipped")]
            v = "PASS" if meas_ok and not bad else ("FAIL" if bad else "SKIP")
            self.verdict("measure", v, f"{len(meas_ok)} timed generate calls ok, {len(bad)} failed, "
                                       f"{len(skipped)} jobs skipped for the budget")
        if self.want("engines"):
            self.same_verdict()
        for kind in ("profile", "syncdebug", "ramp"):
            if not self.want(kind) or not self.want("engines"):
                continue
            rs = [c for c in self.commands if c["kind"] == kind]
            if not rs:
                e = self.by_id("prof")
                why = ("engine prof " + (e.state + (f": {e.error}" if e.error else "")) if e else "no in-process engine")
                planned = [jb for jb in self.jobs if jb["kind"] == kind]
                if planned and all(jb.get("skipped") for jb in planned):
                    why = planned[0]["skipped"]
                self.verdict(kind, "SKIP" if e is None or e.state == "ready" else "FAIL", why)
                continue
            bad = [c for c in rs if not c.get("ok")]
            if bad:
                self.verdict(kind, "FAIL", "; ".join(f"{c.get('mode')}: {c.get('error')}" for c in bad)[:600])
            else:
                self.verdict(kind, "PASS" if not (kind == "syncdebug" and self.cpu) else "PASS",
                             self.command_detail(kind, rs))

    def same_verdict(self):
        """``same_seed:<a>_<b>``, one per ``same`` job: seeded Entropix requests give the
        same ids on engines a and b (one engine twice; MRV1 and MRV2)."""
        for jb in (jb for jb in self.jobs if jb["kind"] == "same"):
            stage = "same_seed:" + "_".join(jb["engines"])
            rs = [c for c in self.commands if c["kind"] == "same" and c["engines"] == jb["engines"]]
            if not rs:
                down = [f"{e.id} {e.state}" + (f": {str(e.error)[:160]}" if e.error else "")
                        for e in map(self.by_id, jb["engines"]) if e and e.state != "ready"]
                # (an engine that did not come up has its own engine: verdict)
                self.verdict(stage, "SKIP", jb.get("skipped") or "; ".join(dict.fromkeys(down))
                             or "not run")
                continue
            r = rs[-1]
            if not r["ok"]:
                self.verdict(stage, "FAIL", r["error"])
                continue
            first = r["first_difference"]
            self.verdict(stage, "PASS" if r["identical"] == r["requests"] else "FAIL",
                         f"{r['identical']} of {r['requests']} seeded Entropix requests x {r['tokens']} tokens "
                         f"identical" + (f"; first difference at request {first[0]}, token {first[1]}"
                                         if first else ""))

    def command_detail(self, kind, rs):
        by = {c.get("mode"): c for c in rs}
        if kind == "profile":
            parts = []
            for m in ("entropix", "stock"):
                c = by.get(m)
                if c:
                    s = c.get("sync_per_step_mean", {})
                    parts.append(f"{m}: {c.get('mean_ms_unprofiled')} ms/step, per step item "
                                 f"{s.get('aten::item', 0)} / _local_scalar_dense {s.get('aten::_local_scalar_dense', 0)}"
                                 f" / cudaStreamSynchronize {s.get('cudaStreamSynchronize', 0)} / cudaMemcpyAsync "
                                 f"{s.get('cudaMemcpyAsync', 0)}")
            return "; ".join(parts) + " (profile.txt)"
        if kind == "syncdebug":
            if self.cpu:
                return ("n/a on CPU (no CUDA sync debug mode); the warning capture ran: "
                        + ", ".join(f"{m} {c.get('mean_per_step')} warnings/step" for m, c in by.items()))
            return ", ".join(f"{m}: {c.get('mean_per_step')} sync warnings/step" for m, c in by.items())
        if kind == "ramp":
            return ", ".join(f"{m}: {c.get('compiles')} Triton compiles while the batch shrank "
                             f"{c.get('requests')}->1 ({c.get('seconds')} s)" for m, c in by.items())
        return ""

    # -- phase C -------------------------------------------------------------
    def bench_cmds(self):
        if self.cpu:
            return [
                ("bench_sampler", ["benchmarks/bench_sampler.py", "--device", "cpu", "--batches", "1,4",
                                   "--vocabs", "49152", "--min-time", "0.2"], 150, 30),
                ("bench_logit_stats", ["benchmarks/bench_logit_stats.py", "--device", "cpu", "--batches", "1,4",
                                       "--vocabs", "49152", "--min-time", "0.2"], 120, 30),
                ("bench_attn_stats", ["benchmarks/bench_attn_stats.py", "--device", "cpu", "--batches", "1",
                                      "--contexts", "512"], 120, 30),
            ]
        return [
            ("bench_sampler", ["benchmarks/bench_sampler.py", "--device", "cuda", "--batches", "1,64,256",
                               "--vocabs", "128256", "--min-time", "0.3", "--top-k", "50", "--top-p", "0.9"], 70, 35),
            ("bench_sampler_temp", ["benchmarks/bench_sampler.py", "--device", "cuda", "--batches", "1,64,256",
                                    "--vocabs", "128256", "--min-time", "0.3"], 60, 35),
            ("bench_logit_stats", ["benchmarks/bench_logit_stats.py", "--device", "cuda", "--dtypes",
                                   "float32,bfloat16", "--batches", "1,64,256,1024", "--vocabs", "128256",
                                   "--rep", "20", "--no-compile"], 90, 40),
            ("bench_attn_stats", ["benchmarks/bench_attn_stats.py", "--graph", "--rep", "20", "--batches",
                                  "1,64,256", "--contexts", "512,4096"], 90, 40),
        ]

    def stop_engines(self):
        """Quit every idle worker, give them a few seconds together, then kill every process
        group (vLLM's engine-core processes included)."""
        for e in self.engines:
            e.send_quit()
        end = time.monotonic() + 8
        for e in self.engines:
            if e.proc is not None:
                try:
                    e.proc.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for e in self.engines:
            e.kill()
            if e.state == "ready":
                e.state = "stopped"

    def phase_c(self):
        self.stop_engines()
        say(f"phase C: engines stopped; benchmarks (budget left {self.left():.0f} s)")
        md = os.path.join(self.out, "bench.md")
        env = dict(os.environ)
        env.update(ENGINE_ENV)
        for name, args, box, minimum in self.bench_cmds():
            stage = "bench_sampler" if name.startswith("bench_sampler") else name
            if not self.want(stage) and not self.want("bench"):
                continue
            left = self.left() - 15
            if left < minimum:
                self.bench[name] = {"verdict": "SKIP", "detail": f"budget: {left:.0f} s left"}
                continue
            b = min(box, left)
            cmd = self.py + ["-P"] + args
            with open(md, "a") as f:
                f.write(f"\n## {name}\n\n`{' '.join(args)}` (box {b:.0f} s)\n\n")
            rc, secs, out, to = run_boxed(cmd, b, log_path=md, env=env)
            v = "TIMEOUT" if to else ("PASS" if rc == 0 else "FAIL")
            tail = [ln for ln in out.splitlines() if ln.strip()][-1:] if rc else []
            self.bench[name] = {"verdict": v, "seconds": round(secs, 1), "rc": rc,
                                "detail": (tail[0][:300] if tail else "") if v != "PASS" else "tables in bench.md"}
            say(f"  {name}: {v} in {secs:.0f} s")
        for stage in ("bench_sampler", "bench_logit_stats", "bench_attn_stats"):
            if not self.want(stage) and not self.want("bench"):
                continue
            rs = {k: v for k, v in self.bench.items() if k.startswith(stage)}
            if not rs:
                self.verdict(stage, "SKIP", "not run")
                continue
            vs = [r["verdict"] for r in rs.values()]
            v = "PASS" if all(x == "PASS" for x in vs) else ("SKIP" if all(x == "SKIP" for x in vs) else
                                                             next(x for x in vs if x not in ("PASS", "SKIP")))
            self.verdict(stage, v, "; ".join(f"{k}: {r['verdict']} {r.get('detail', '')}".strip() for k, r in rs.items()),
                         sum(r.get("seconds") or 0 for r in rs.values()))

    # -- output ----------------------------------------------------------------
    def results(self) -> dict:
        eng = {}
        for e in self.engines:
            eng[e.id] = {"title": e.title, "model": e.model_label, "plugin": e.plugin, "entropix": e.entropix,
                         "runner_asked": e.runner, "graphs_asked": e.graphs, "inproc": e.inproc,
                         "env": {k: v for k, v in e.env.items() if (k.startswith("VLLM_") or k == "TRITON_CACHE_DIR")
                                 and v is not None},
                         "state": e.state, "error": e.error, "phase": e.phase, "info": e.info,
                         "start_s": round((e.t_ready or time.monotonic()) - e.t_start, 1) if e.t_start else None}
        return {"meta": dict(self.meta, elapsed_s=round(el(), 1)), "stages": self.stages, "figures": self.figures,
                "engines": eng, "measurements": self.measurements,
                "jobs": [{k: v for k, v in j.items()} for j in self.jobs],
                "commands": [{k: v for k, v in c.items() if k != "tables"} for c in self.commands],
                "bench": self.bench}

    def write(self):
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results(), f, indent=1, default=str)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(self.summary_md())
        self.write_profile()
        self.write_engine_logs()

    def write_profile(self):
        rs = [c for c in self.commands if c.get("ok")]
        if not rs:
            return
        lines = [f"# Device check profile ({self.mode}); engine prof: "
                 + (self.by_id("prof").title if self.by_id("prof") else ""), ""]
        for c in rs:
            lines.append(f"## {c['kind']} {c.get('mode')} ({c.get('requests')} requests)")
            if c["kind"] == "profile":
                lines.append(f"prefill steps {c.get('prefill_steps')}, warm-up {c.get('warm_steps')}; step ms unprofiled "
                             f"mean {c.get('mean_ms_unprofiled')}: {[s['ms'] for s in c.get('step_ms_unprofiled', [])]}")
                lines.append(f"profiled mean {c.get('mean_ms_profiled')}; tokens/step "
                             f"{[s['new_tokens'] for s in c.get('step_ms_profiled', [])]}")
                lines.append(f"sync points and copies per profiled step (mean): {c.get('sync_per_step_mean')}")
                for j, s in enumerate(c.get("sync_per_step", [])):
                    lines.append(f"  step {j:2d}: {s}")
                lines.append(f"trace: {c.get('trace')}")
                for t, tab in (c.get("tables") or {}).items():
                    lines += ["", f"### top by {tab['sort']}", tab["table"]]
            else:
                lines.append(json.dumps({k: v for k, v in c.items() if k not in ("ev", "id")}, default=str))
            lines.append("")
        with open(os.path.join(self.out, "profile.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def write_engine_logs(self):
        parts = []
        for e in self.engines:
            x = e.log_excerpt()
            parts.append(f"===== engine {e.id}: {e.title} [{e.state}] {e.error or ''}")
            parts.append("--- key lines")
            parts += x["key"]
            parts.append("--- tail")
            parts += x["tail"]
            parts.append("")
        if parts:
            with open(os.path.join(self.out, "engines.log"), "w") as f:
                f.write("\n".join(parts) + "\n")

    def summary_md(self) -> str:
        p = self.meta.get("platform", {})
        L = [f"# GPU device check ({self.mode}), {self.meta['started_utc']} UTC",
             "",
             f"device {p.get('device') or ('cpu' if self.cpu else '?')}; python {p.get('python')}; torch {p.get('torch')} "
             f"(CUDA {p.get('cuda')}); triton {p.get('triton')}; vllm {p.get('vllm')}; commit {self.meta.get('commit')}; "
             f"budget {self.budget:.0f} s; elapsed {el():.0f} s",
             f"command: `{self.meta.get('command')}`",
             "",
             "Kit engines: vLLM 0.32's Python tree on the device's torch, native ops, TRITON_ATTN, dummy "
             "weights: use the ratios (one engine, one run), not the absolute tok/s.",
             "", "## Verdicts", "", "| stage | verdict | s | detail |", "| --- | --- | --- | --- |"]
        if self.meta.get("setup"):
            s = self.meta["setup"]
            L.append(f"| setup | {s.split()[0]} |  | {md_cell(' '.join(s.split()[1:]))} |")
        for k, v in self.stages.items():
            L.append(f"| {k} | {v['verdict']} | {'' if v['seconds'] is None else v['seconds']} | {md_cell(v['detail'])} |")
        if self.figures:
            L += ["", "## Acceptance figures (issue 19)", "", "| figure | value | target | verdict | best tok/s (a / b) | note |",
                  "| --- | --- | --- | --- | --- | --- |"]
            for f in self.figures:
                ab = f"{f.get('a')} / {f.get('b')}" if f.get("a") else ""
                L.append(f"| {f['figure']} | {f['value']} | {f['target']} | {f['verdict']} | {ab} | {md_cell(f.get('note') or '')} |")
        if self.engines:
            L += ["", "## Engines", "", "| id | engine | model | runner (asked) | sampler | cudagraph mode in the worker (asked) | up + warm s | state |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for e in self.engines:
                eng = (e.info or {}).get("engine") or {}
                asked = "FULL_DECODE_ONLY" if e.graphs else "NONE"
                fe = (e.info or {}).get("front_end_cudagraph_mode")
                L.append(f"| {e.id} | {e.title} | {e.model} | {short(eng.get('runner'))} ({e.runner.upper().replace('V', 'MRV')}) | "
                         f"{short(eng.get('sampler'))} | {eng.get('cudagraph_mode', '-')}"
                         f"{'' if fe in (None, eng.get('cudagraph_mode')) else f' (front end {fe})'} ({asked}) | "
                         f"{(e.info or {}).get('engine_up_s', '-')} + {(e.info or {}).get('warm_s', '-')} | "
                         f"{e.state}{': ' + md_cell(str(e.error)[:160]) if e.error else ''} |")
        rows = self.throughput_rows()
        if rows:
            L += ["", "## Throughput (output tok/s, best of the runs; ratio = Entropix rows / stock rows of the same engine)",
                  "", "| engine | conc | tokens/req | Entropix | stock rows | ratio | runs | top-token share E/S |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"] + rows
        xrows = self.cross_rows()
        if xrows:
            L += ["", "## Across engines (measured alternately)", "", "| a | b | conc | a tok/s | b tok/s | a / b | runs |",
                  "| --- | --- | --- | --- | --- | --- | --- |"] + xrows
        L += self.profile_md()
        skipped = [jb for jb in self.jobs if jb.get("skipped")]
        if skipped:
            L += ["", f"{len(skipped)} jobs skipped for the budget: "
                  + ", ".join(f"{jb['kind']} {jb.get('engine') or '/'.join(jb['engines'])} @{jb.get('conc')}" for jb in skipped)]
        L += ["", "Files: summary.md, results.json (everything), check.log, setup.log, tests.log, bench.md, "
              "profile.txt, engines.log.", ""]
        return "\n".join(L)

    def throughput_rows(self):
        keys = []
        for m in self.measurements:
            if m["mode"] in ("entropix", "stock"):
                k = (m["engine"], m["conc"], m["tokens_per_request"])
                if k not in keys:
                    keys.append(k)
        rows = []
        for eid, conc, tok in keys:
            ent, ne = self.best(eid, conc, "entropix")
            st, ns = self.best(eid, conc, "stock")
            r = round(ent / st, 3) if ent and st else None
            shares = []
            for mode in ("entropix", "stock"):
                xs = [m.get("top_token_share") for m in self.measurements
                      if m["engine"] == eid and m["conc"] == conc and m["mode"] == mode and m.get("ok")]
                shares.append(f"{xs[-1]:.2f}" if xs and xs[-1] is not None else "-")
            fails = [m for m in self.measurements if m["engine"] == eid and m["conc"] == conc and not m.get("ok")]
            rows.append(f"| {eid} | {conc} | {tok} | {ent or '-'} | {st or '-'} | {r if r is not None else '-'} | "
                        f"{ne}+{ns}{' (' + str(len(fails)) + ' failed)' if fails else ''} | {'/'.join(shares)} |")
        return rows

    def cross_rows(self):
        rows, seen = [], set()
        for jb in self.jobs:
            if jb["kind"] != "cross" or not jb.get("ran"):
                continue
            a, b = jb["engines"]
            (ma, mb), conc = jb["modes"], jb["conc"]
            k = (a, b, conc)
            if k in seen:
                continue
            seen.add(k)
            # off / plain reads "plugin-off over no-plugin": b over a
            (x, nx), (y, ny) = self.best(b, conc, mb), self.best(a, conc, ma)
            rows.append(f"| {b} ({mb}) | {a} ({ma}) | {conc} | {x or '-'} | {y or '-'} | "
                        f"{round(x / y, 3) if x and y else '-'} | {nx}+{ny} |")
        return rows

    def profile_md(self):
        L = []
        prof = {c.get("mode"): c for c in self.commands if c["kind"] == "profile" and c.get("ok")}
        if prof:
            L += ["", "## Profile of decode steps (engine prof: in-process, trace on)", "",
                  "| rows | ms/step (unprofiled) | item | _local_scalar_dense | cudaStreamSynchronize | cudaMemcpyAsync | cudaMemcpy | aten::copy_ | nonzero |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for m, c in prof.items():
                s = c.get("sync_per_step_mean", {})
                L.append(f"| {m} ({c.get('requests')} requests, {c.get('steps')} steps) | {c.get('mean_ms_unprofiled')} | "
                         + " | ".join(str(s.get(k, 0)) for k in ("aten::item", "aten::_local_scalar_dense",
                                                                 "cudaStreamSynchronize", "cudaMemcpyAsync",
                                                                 "cudaMemcpy", "aten::copy_", "aten::nonzero")) + " |")
            for m, c in prof.items():
                for title in ("self_cpu", "self_device"):
                    rows = (c.get("top") or {}).get(title) or []
                    if rows:
                        L.append("")
                        L.append(f"top {title.replace('_', ' ')} ({m} rows), us per step: "
                                 + "; ".join(f"{r['name'][:60]} {r['us_per_step']} ({r['calls_per_step']}x)" for r in rows[:6]))
                if c.get("trace"):
                    L.append(f"\ntrace ({m} rows): {c['trace']}")
        sd = [c for c in self.commands if c["kind"] == "syncdebug" and c.get("ok")]
        if sd:
            L += ["", "## torch.cuda.set_sync_debug_mode(\"warn\") over decode steps", ""]
            for c in sd:
                L.append(f"- {c.get('mode')} rows: {c.get('mean_per_step')} warnings/step {c.get('warnings_per_step')}"
                         + ("" if c.get("cuda") else " (CPU: no sync debug mode)") + "; at: "
                         + ", ".join(f"{w['at']} x{w['per_step']}/step" for w in c.get("where", [])[:6]))
        rp = [c for c in self.commands if c["kind"] == "ramp" and c.get("ok")]
        if rp:
            L += ["", "## Triton compiles while the batch shrinks (new entries in the engine's private TRITON_CACHE_DIR)", ""]
            for c in rp:
                L.append(f"- {c.get('mode')} rows, {c.get('requests')} -> 1: {c.get('compiles')} compiles in "
                         f"{c.get('seconds')} s: {c.get('by_kernel')}")
        return L

    def brief(self) -> str:
        """The end of the call's output (the device tool returns its last 12,000 characters):
        one line per stage verdict and per acceptance figure; summary.md has the rest."""
        p = self.meta.get("platform", {})
        L = [f"== device check ({self.mode}): {p.get('device') or 'cpu'}, torch {p.get('torch')}, triton "
             f"{p.get('triton')}, vllm {p.get('vllm')}; commit {self.meta.get('commit')}; {el():.0f} s of {self.budget:.0f}",
             "== verdicts"]
        if self.meta.get("setup"):
            L.append(f"setup: {self.meta['setup'][:200]}")
        for k, v in self.stages.items():
            sec = "" if v["seconds"] is None else f" [{v['seconds']:.0f} s]"
            L.append(f"{k}: {v['verdict']}{sec} {v['detail'][:220]}")
        if self.figures:
            L.append("== acceptance (issue 19)")
            for f in self.figures:
                ab = f" ({f.get('a')} / {f.get('b')} tok/s)" if f.get("a") else ""
                L.append(f"{f['verdict']:7s} {f['value']} (target {f['target']}){ab}: {f['figure']}"
                         + (f" - {f['note'][:200]}" if f.get("note") else ""))
        rows = self.throughput_rows()
        if rows:
            L.append("== throughput: | engine | conc | tokens/req | Entropix | stock rows | ratio | runs | top-token share E/S |")
            L += rows
        L += self.cross_rows()
        for c in self.commands:
            if c.get("ok") and c["kind"] == "profile":
                L.append(f"profile {c.get('mode')}: {c.get('mean_ms_unprofiled')} ms/step; per step "
                         f"{ {k: v for k, v in (c.get('sync_per_step_mean') or {}).items() if v} }")
            elif c.get("ok") and c["kind"] == "syncdebug":
                L.append(f"syncdebug {c.get('mode')}: {c.get('mean_per_step')} warnings/step at "
                         + ", ".join(f"{w['at']} x{w['per_step']}" for w in c.get("where", [])[:4]))
            elif c.get("ok") and c["kind"] == "ramp":
                L.append(f"ramp {c.get('mode')}: {c.get('compiles')} Triton compiles {c.get('by_kernel')}"[:400])
        L.append(f"== files in {self.out}: summary.md results.json check.log setup.log tests.log bench.md "
                 "profile.txt engines.log")
        return "\n".join(L)

    def print_summary(self):
        text = self.summary_md()
        if LOG:
            LOG.write(text + "\n")
        print(self.brief(), flush=True)


def clean_error(msg):
    """vLLM's refusals arrive wrapped in pydantic's ValidationError: keep the message."""
    msg = re.sub(r"\s+", " ", str(msg or ""))
    m = re.search(r"Value error, (.+?) \[type=", msg)
    return m.group(1) if m else msg


def short(s):
    if not s:
        return "-"
    return s.replace("vllm.v1.worker.", "").replace("entropix_vllm.integration.", "entropix:")


def md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> int:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--budget", type=float, default=None, help="seconds for this script (default per mode)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(PROJECT, "gpu_out"))
    ap.add_argument("--work", default=None, help="scratch folder (engine logs, traces; default /tmp/gpucheck_work)")
    ap.add_argument("--kit", default=os.path.join(PROJECT, ".gpukit"))
    ap.add_argument("--python", default=None, help="interpreter for workers, tests and benchmarks")
    ap.add_argument("--stages", default=None,
                    help="comma list of platform,tests,engines,profile,syncdebug,ramp,bench,bench_sampler,"
                         "bench_logit_stats,bench_attn_stats (default: all)")
    ap.add_argument("--tests", default=None, help="space-separated test files (default per mode)")
    ap.add_argument("--setup", default=None, help="the setup's verdict line, for the summary")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--command", default=" ".join(sys.argv))
    ap.add_argument("--plan", action="store_true", help="print the engines and jobs of --mode and exit")
    ap.add_argument("--quiet", action="store_true", help="progress to check.log only; stdout: the brief at the end")
    a = ap.parse_args(argv)
    global QUIET
    QUIET = a.quiet
    if a.plan:
        print(plan_text(a.mode, a.kit, a.work or "/tmp/gpucheck_work"))
        return 0
    os.makedirs(a.out, exist_ok=True)
    a.work = a.work or os.environ.get("GPUCHECK_WORK") or "/tmp/gpucheck_work"
    os.makedirs(a.work, exist_ok=True)
    for f in os.listdir(a.work):  # no stale traces or logs of an earlier run
        if f.startswith(("engine_", "trace_")):
            os.remove(os.path.join(a.work, f))
    LOG = open(os.path.join(a.out, "check.log"), "a", buffering=1)
    c = Check(a)
    say(f"mode {a.mode}, budget {c.budget:.0f} s, out {a.out}, work {a.work}, python {' '.join(c.py)}, "
        f"PYTHONPATH={os.environ.get('PYTHONPATH')}")

    def on_term(signum, frame):  # the caller's timeout: keep what is done
        say(f"signal {signum}: stopping the engines, writing the summary")
        for e in c.engines:
            e.kill()
        c.write()
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    try:
        for phase in (c.phase_a, c.phase_b, c.phase_c):
            try:
                phase()
            except Exception as e:  # noqa: BLE001 (a bug here must not cost the other phases)
                import traceback

                say(f"INTERNAL ERROR in {phase.__name__}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                c.verdict(f"internal:{phase.__name__}", "FAIL", f"{type(e).__name__}: {e}")
    finally:
        for e in c.engines:
            e.kill()
        c.write()
        c.print_summary()
    bad = [k for k, v in c.stages.items() if v["verdict"] in ("FAIL", "TIMEOUT")]
    say(f"done in {el():.0f} s; {len(c.stages)} stages, {len(bad)} failed: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
