"""The seam (``integration/vllm_api.py``, checked by ``integration/vllm_source.py``) against vLLM's source.

* Every internal of ``vllm_api.INTERNALS`` (import paths, classes, methods with
  the parameters the plugin passes, properties, fields, attributes) is checked
  by reading the source with ``ast`` (nothing imported) in the installed vLLM
  (0.32) and in the ``vllm==0.33.0`` wheel, which ``pip download --no-deps``
  fetches into ``.cache/vllm-wheels/`` (ignored by git) on first use; the test
  is skipped, saying so, only when pip cannot reach the index.
* A doctored copy of each (one internal renamed, a parameter renamed, a module
  removed, ...) fails, naming that internal, and only it.
* The start-up probe on a doctored vLLM: ``plugin.register`` logs one error
  naming what is missing and leaves vLLM untouched (a fresh interpreter).
* The version-keyed accessors, on 0.32 for real and with 0.33's own classes
  (its ``sampling_params.py`` and ``v1/sample/sampler.py`` loaded from the
  wheel).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from entropix_vllm.integration import patches, vllm_api, vllm_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = ROOT / ".cache" / "vllm-wheels"
NEXT = "0.33.0"
# pip's words when it cannot reach the index (no network, proxy, DNS).
_UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|"
                          r"Temporary failure in name resolution|Name or service not known|"
                          r"Network is unreachable|ProxyError|ConnectTimeout|ReadTimeout|"
                          r"Connection refused|Could not fetch URL|No route to host", re.I)


@pytest.fixture(scope="module")
def next_wheel() -> Path:
    """The vllm 0.33.0 wheel (cached; downloaded with pip on first use)."""
    cached = sorted(WHEEL_DIR.glob(f"vllm-{NEXT}-*.whl"))
    if cached:
        return cached[0]
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"vllm=={NEXT}", "-d", str(WHEEL_DIR), "--progress-bar", "off",
           "--disable-pip-version-check"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        if _UNREACHABLE.search(out):
            pytest.skip(f"pip cannot reach the package index to fetch vllm=={NEXT}: "
                        f"{out.strip().splitlines()[-1]}")
        pytest.fail(f"`{' '.join(cmd)}` failed (rc {r.returncode}):\n{out[-3000:]}")
    cached = sorted(WHEEL_DIR.glob(f"vllm-{NEXT}-*.whl"))
    assert cached, f"pip download succeeded but left no vllm-{NEXT} wheel in {WHEEL_DIR}"
    return cached[0]


def doctored(base: vllm_source.Source, edits: dict) -> vllm_source.Source:
    """``base`` with ``{relative path: (old, new) or None}`` applied (None: no such
    file); every ``old`` must occur (the doctoring must hit)."""
    def read(rel):
        text = base._read(rel)
        if rel in edits:
            if edits[rel] is None:
                return None
            old, new = edits[rel]
            assert text is not None and old in text, (rel, old)
            text = text.replace(old, new)
        return text
    return vllm_source.Source(read, f"doctored {base.label}")


# Each edit renames one internal; the check must name exactly these entries.
DOCTORINGS = {
    "method renamed": (
        {"vllm/v1/engine/input_processor.py": ("def _validate_params(", "def _check_params(")},
        ["vllm.v1.engine.input_processor:InputProcessor._validate_params (method)"]),
    "attribute renamed": (
        {"vllm/v1/worker/gpu_model_runner.py": ("self.optimistic_seq_lens_cpu",
                                                "self.optimistic_seq_lens_host")},
        ["vllm.v1.worker.gpu_model_runner:GPUModelRunner.optimistic_seq_lens_cpu (attribute)"]),
    "parameter renamed": (
        {"vllm/v1/worker/gpu/sample/sampler.py": (
            "        idx_mapping_np: np.ndarray,\n        pos: torch.Tensor,\n"
            "        input_ids: torch.Tensor,\n        expanded_local_pos: torch.Tensor,\n"
            "        seq_lens_upper_bound_np: np.ndarray,\n        return_logprobs",
            "        idx_mapping_np: np.ndarray,\n        positions: torch.Tensor,\n"
            "        input_ids: torch.Tensor,\n        expanded_local_pos: torch.Tensor,\n"
            "        seq_lens_upper_bound_np: np.ndarray,\n        return_logprobs")},
        ["vllm.v1.worker.gpu.sample.sampler:Sampler.sample (method)"]),
    "rebound name gone": (
        {"vllm/v1/worker/gpu_model_runner.py": ("from vllm.v1.sample.sampler import Sampler\n",
                                                "from vllm.v1.sample.sampler import Sampler as S\n")},
        ["vllm.v1.worker.gpu_model_runner:Sampler (name)"]),
    "field renamed": (
        {"vllm/sampling_params.py": ("    extra_args: dict[str, Any] | None = None",
                                     "    extra_arguments: dict[str, Any] | None = None")},
        ["vllm.sampling_params:SamplingParams.extra_args (field)"]),
}


def _names(problems):
    return sorted(p.split(": ", 1)[0] for p in problems)


# ----------------------------------------------------------------------------
# The installed vLLM (0.32) and 0.33.0
# ----------------------------------------------------------------------------
def test_installed_vllm_has_every_internal():
    src = vllm_source.Source.installed()
    version = src.version()
    series = vllm_api.series_of(version)
    assert series == "0.32", version
    n = len(vllm_api.applicable(series))
    problems = vllm_source.check(src, series)
    print(f"vLLM {version} ({src.label}): {n} internals checked, {len(problems)} missing")
    assert problems == []


def test_next_vllm_has_every_internal(next_wheel):
    src = vllm_source.Source.wheel(str(next_wheel))
    assert src.version() == NEXT
    n = len(vllm_api.applicable("0.33"))
    problems = vllm_source.check(src, "0.33")
    print(f"vLLM {NEXT} ({next_wheel.name}): {n} internals checked, {len(problems)} missing")
    assert problems == []
    assert vllm_source.probe(src).ok


def test_series_differ_where_the_seam_says():
    """0.32's source lacks exactly the 0.33-only internals (the accessors' keys)."""
    only = [str(e) for e in vllm_api.INTERNALS if e.series == vllm_api.ONLY_033]
    assert len(only) >= 4
    assert _names(vllm_source.check(vllm_source.Source.installed(), "0.33")) == sorted(only)


@pytest.mark.parametrize("case", sorted(DOCTORINGS))
def test_doctored_next_vllm_fails_naming_the_internal(next_wheel, case):
    edits, named = DOCTORINGS[case]
    src = doctored(vllm_source.Source.wheel(str(next_wheel)), edits)
    problems = vllm_source.check(src, "0.33")
    assert _names(problems) == sorted(named), problems


@pytest.mark.parametrize("case", sorted(DOCTORINGS))
def test_doctored_installed_vllm_fails_naming_the_internal(case):
    edits, named = DOCTORINGS[case]
    src = doctored(vllm_source.Source.installed(), edits)
    assert _names(vllm_source.check(src, "0.32")) == sorted(named)


def test_missing_module_names_every_internal_in_it(next_wheel):
    src = doctored(vllm_source.Source.wheel(str(next_wheel)),
                   {"vllm/v1/worker/gpu/states.py": None})
    want = sorted(str(e) for e in vllm_api.INTERNALS
                  if e.module == "vllm.v1.worker.gpu.states")
    problems = vllm_source.check(src, "0.33")
    assert _names(problems) == want and len(want) == 3
    assert all("module vllm.v1.worker.gpu.states not found" in p for p in problems)


def test_unsupported_version_is_named():
    r = vllm_source.probe(vllm_source.Source.installed(), version="0.34.0")
    assert not r.ok and "vLLM 0.34.0 is not a supported version" in r.problems[0]
    assert vllm_api.series_of("0.32.1+cpu") == "0.32" and vllm_api.series_of("dev") == ""


# ----------------------------------------------------------------------------
# The start-up probe leaves vLLM untouched
# ----------------------------------------------------------------------------
PROBE_SCRIPT = textwrap.dedent('''
    import logging, sys
    from entropix_vllm.integration import plugin, vllm_api, vllm_source
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor
    import vllm.v1.worker.gpu_model_runner as mrv1

    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    logging.getLogger("vllm.entropix").addHandler(Keep())

    def state():
        return (EngineArgs.__dict__["add_cli_args"], EngineArgs.__dict__["from_cli_args"],
                VllmConfig.__post_init__, VllmConfig.__dict__["use_v2_model_runner"],
                InputProcessor._validate_params, mrv1.GPUModelRunner.__init__, mrv1.Sampler)

    base = vllm_source.Source.installed()
    def read(rel):
        text = base._read(rel)
        if rel == "vllm/v1/worker/gpu_model_runner.py":
            text = text.replace("self.optimistic_seq_lens_cpu", "self.optimistic_seq_lens_host")
        return text
    before = state()
    active = plugin.register(source=vllm_source.Source(read, "doctored"))
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    print("ACTIVE", active, "UNTOUCHED", state() == before, "ERRORS", len(errors))
    print("ERROR:", errors[0] if errors else "")
''')


def test_probe_mismatch_logs_one_error_and_leaves_vllm_untouched(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env["VLLM_PLUGINS"] = "none"   # nothing loads the plugin but the script
    r = subprocess.run([sys.executable, "-P", "-c", PROBE_SCRIPT], capture_output=True,
                       text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ACTIVE", "ERROR:"))]
    assert lines[0] == "ACTIVE False UNTOUCHED True ERRORS 1", r.stdout[-3000:]
    assert "NOT active" in lines[1] and "vLLM runs unchanged" in lines[1]
    assert "GPUModelRunner.optimistic_seq_lens_cpu" in lines[1]


# ----------------------------------------------------------------------------
# Version-keyed accessors
# ----------------------------------------------------------------------------
def _load_from_wheel(wheel: Path, rel: str, name: str) -> types.ModuleType:
    """A module of the 0.33 wheel, executed on top of the installed vLLM."""
    text = zipfile.ZipFile(wheel).read(rel).decode()
    mod = types.ModuleType(name)
    mod.__file__ = f"{wheel.name}/{rel}"
    sys.modules[name] = mod
    try:
        exec(compile(text, mod.__file__, "exec"), mod.__dict__)
    finally:
        sys.modules.pop(name, None)
    return mod


@pytest.fixture(scope="module")
def cpu_config():
    from vllm.engine.arg_utils import EngineArgs

    from entropix_vllm import bundled
    from entropix_vllm.integration import plugin

    plugin.register()
    try:
        path = bundled.bundled_model_path(build=False)
    except FileNotFoundError as e:
        pytest.skip(f"the bundled model is not built ({e})")
    return EngineArgs(model=path, dtype="float32", max_model_len=512,
                      additional_config={"sampler": "entropix"}).create_engine_config()


def test_v1_runner_blockers_are_vllms_own(cpu_config):
    import copy

    from vllm.config.attention import HiSparseConfig

    assert vllm_api.v1_runner_blockers(cpu_config) == []
    cfg = copy.copy(cpu_config)
    cfg.parallel_config = copy.copy(cpu_config.parallel_config)
    cfg.parallel_config.enable_batch_sharded_sampling = True
    cfg.attention_config = copy.copy(cpu_config.attention_config)
    cfg.attention_config.hisparse_config = HiSparseConfig()
    assert vllm_api.v1_runner_blockers(cfg) == ["batch-sharded sampling", "HiSparse attention"]


def test_beam_allowlist_refusal_on_033s_beam_search_params(next_wheel, cpu_config, monkeypatch):
    sp = _load_from_wheel(next_wheel, "vllm/sampling_params.py", "_entropix_vllm033_sp")
    cls = sp.BeamSearchParams
    orig = cls.configure_logprobs
    why = "a beam search with allowed_token_ids needs vLLM's V2 model runner (test)"
    answer = {"why": why}
    monkeypatch.setattr(vllm_api, "running_series", lambda: "0.33")
    assert patches.apply_beam_allowlist_guard(lambda config: answer["why"], cls)
    assert patches.apply_beam_allowlist_guard(lambda config: None, cls)   # idempotent
    assert cls.configure_logprobs.__wrapped__ is orig
    assert patches.patched(cls.__dict__["configure_logprobs"])
    error = vllm_api.validation_error_cls()
    beam = cls(beam_width=2, max_tokens=3, allowed_token_ids=[5, 6])
    with pytest.raises(error, match="needs vLLM's V2 model runner") as e:
        beam.configure_logprobs(sp.SamplingParams(max_tokens=1), cpu_config)
    assert e.value.parameter == "allowed_token_ids"
    # No refusal: 0.33's own check runs (this CPU engine runs MRV1 by vLLM's choice).
    answer["why"] = None
    with pytest.raises(ValueError, match="Beam allowlists require the V2 model runner"):
        beam.configure_logprobs(sp.SamplingParams(max_tokens=1), cpu_config)
    # Without an allowlist nothing is refused.
    params = sp.SamplingParams(max_tokens=1)
    cls(beam_width=2, max_tokens=3).configure_logprobs(params, cpu_config)
    # On the installed 0.32 there is nothing to wrap.
    monkeypatch.undo()
    assert patches.apply_beam_allowlist_guard(lambda config: why) is False


def test_fused_sample_guard_on_033s_sampler(next_wheel, monkeypatch):
    mod = _load_from_wheel(next_wheel, "vllm/v1/sample/sampler.py", "_entropix_vllm033_smp")
    # 0.33's Sampler.forward asks the module-level name, so wrapping it takes effect.
    forward = next(n for n in ast.walk(ast.parse(zipfile.ZipFile(next_wheel).read(
        "vllm/v1/sample/sampler.py").decode())) if isinstance(n, ast.FunctionDef)
        and n.name == "forward")
    assert any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
               and c.func.id == "mixed_sample_eligible" for c in ast.walk(forward))
    calls = []
    orig = mod.mixed_sample_eligible
    monkeypatch.setattr(mod, "mixed_sample_eligible",
                        lambda *a, **k: calls.append(a) or orig(*a, **k))
    active = {"on": True}
    monkeypatch.setattr(vllm_api, "running_series", lambda: "0.33")
    assert patches.apply_mrv1_fused_sample_guard(lambda: active["on"], mod)
    assert mod.mixed_sample_eligible("sm", False) is False and calls == []   # Entropix: never
    active["on"] = False
    assert mod.mixed_sample_eligible(None, True) is False and len(calls) == 1  # vLLM decides
    # Keyed by the running series: nothing to guard on 0.32, the guard on 0.33.
    monkeypatch.setattr(vllm_api, "running_series", lambda: "0.32")
    assert patches.apply_mrv1_fused_sample_guard(lambda: True) is False
    monkeypatch.setattr(vllm_api, "running_series", lambda: "0.33")
    import vllm.v1.sample.sampler as installed
    monkeypatch.setattr(installed, "mixed_sample_eligible", orig, raising=False)
    assert patches.apply_mrv1_fused_sample_guard(lambda: True) is True
    assert installed.mixed_sample_eligible("sm", False) is False


def test_kv_cache_update_bypass_is_read_on_033_only(monkeypatch):
    layer = types.SimpleNamespace(kv_cache_update_bypass=True)
    assert vllm_api.layer_writes_kv_itself(layer) is False          # 0.32: no such models
    monkeypatch.setattr(vllm_api, "running_series", lambda: "0.33")
    assert vllm_api.layer_writes_kv_itself(layer) is True
    assert vllm_api.layer_writes_kv_itself(types.SimpleNamespace()) is False
