#!/usr/bin/env bash
# THE device check: one call on the lent GPU machine (one H200, 16 cores; Python 3.12,
# torch 2.11+cu130, Triton 3.6; no vLLM, no network) runs the Triton kernel tests, real
# vLLM 0.32 engines with and without this plugin, and the kernel and sampler benchmarks,
# each time-boxed, inside one budget; results to $OUT (the device tool's folder).
#
# Before the call, here (CPU):    bash scripts/gpu_kit.sh          # -> .gpukit (git-ignored)
# The call (the device tool `run`), ~9 minutes plus the machine's start:
#     command:   GPU_CHECK_COMMIT=<git rev-parse --short HEAD> bash scripts/gpu_check.sh
#     carry:     [".gpukit"]
#     timeout_s: 600           (the script ends itself within GPU_CHECK_BUDGET_S, 540 s)
#   If `status` shows less than ~13 minutes of device time left, prefix the command with
#   GPU_CHECK_BUDGET_S=<budget_left_s - 240> (the machine's start counts against it too);
#   everything in $OUT is rewritten after every job, so a kill keeps what was measured.
#   --quick: about 4 minutes (timeout_s 300): 7 engines, concurrency 1/64/256 on the
#   acceptance engines only, shorter profile, no benchmarks.
#
#   bash scripts/gpu_check.sh [--quick] [--budget S] [--stages LIST] [--cpu-rehearsal]
#   bash scripts/gpu_check.sh tests|bench|kernels   # the old checks: Triton tests and/or kernel
#                                                    # benchmarks, no vLLM, no kit needed
#   python3 scripts/gpukit/check.py --mode full|quick|cpu --plan   # the engines and the jobs
#
# Stages (scripts/gpukit/check.py). Expected times on the H200, from the kit's first runs
# there (setup 12 s, vLLM import 19 s, sampler benchmark 63 s, one engine 95 s of which its
# start 35 s) and the plan (not yet run as a whole):
#   setup      install .gpukit's wheels + the plugin (from this checkout) into /tmp/site, patch
#              vLLM (scripts/gpukit/device_setup.py, patches.py)                  ~12 s
#   A (concurrent, ~100-180 s): every engine builds and warms up in its own process group
#              (each concurrency it will be timed at, twice); the platform probe (vLLM on
#              CUDA, plugin found by vLLM's loader, probe ok); the Triton kernel tests
#              (tests/kernels/test_triton_logit_stats.py, test_candidate_sampling.py, test_decide.py,
#              test_triton_attn_stats.py and any tests/**/test_*launch*|*recompil*|*graph*.py;
#              pytest -x -n 4 --timeout 120, the whole run boxed at 120 s); engines not ready
#              within 240 s are killed (FAIL, with vLLM's root cause from the engine's log)
#   engines:   plain (VLLM_PLUGINS=""), off (plugin, sampler off), ent (Entropix, MRV1),
#              ent2 (MRV2), entd (runner left to vLLM/plugin), g1 / goff / g2 (full CUDA
#              graphs: compilation mode NONE, cudagraph_mode FULL_DECODE_ONLY, sizes 1/64/256),
#              lent / lent2 / lg1 (the Llama-3-8B shape, token-id prompts, cot_token 2564),
#              prof (engine core in-process, trace on); SmolLM2-135M shape unless "l"; bf16,
#              dummy weights, TRITON_ATTN, native ops, a fixed KV cache (1 / 5 GiB)
#   B (~250 s): timed generate() calls, one at a time: Entropix rows and stock rows
#              (extra_args {"entropix": false}) of one engine back to back, alternating order;
#              off vs plain alternately; then in prof: torch.profiler over 16 decode steps
#              of 64 requests (Entropix rows, then stock rows: top CPU/GPU costs, syncs and
#              copies per step); seeded Entropix requests (8 x 24 tokens) on ent twice and on
#              ent and ent2: the same ids (same_seed:*, MRV1 vs MRV2 for issue 18);
#              torch.cuda.set_sync_debug_mode("warn") over 8 steps (a second
#              sync count, with where), Triton compiles while a batch shrinks 64 -> 1.
#              Acceptance jobs first, coverage after; what does not fit is skipped, saying so
#   C (~100 s): engines stopped; bench_sampler (--device cuda, batch 1/64/256, vocab
#              128256, top-k/top-p and temperature only), bench_logit_stats, bench_attn_stats
#              (trimmed shapes), as long as the budget lasts
#
# Back in $OUT (8 files): summary.md (verdicts, the acceptance figures of issue 19, tables),
# results.json (everything), check.log (all output), setup.log, tests.log, bench.md,
# profile.txt, engines.log (each engine's key log lines and tail). The output itself (what
# the device tool returns) ends with a brief: one line per stage verdict and acceptance
# figure, the throughput rows, the sync counts. Exit code 1 if a stage failed.
#
# Environment: GPU_CHECK_BUDGET_S (default 540; 230 with --quick; 900 for the rehearsal),
# GPU_CHECK_COMMIT (recorded: the device copy has no .git), PYTHON (default python3),
# GPUKIT_SITE (default /tmp/site), OUT (default ./gpu_out), GPUCHECK_WORK (engine logs,
# traces; default /tmp/gpucheck_work).
#
# Without a GPU (here): bash scripts/gpu_check.sh --cpu-rehearsal runs the same orchestration
# with the CPU vLLM of .venv and the bundled model (real weights, fp32, concurrency 1 and 4,
# no graphs; MRV2 refused by vLLM: SKIP; 4-7 minutes on 2 shared cores); tests/
# test_gpu_kit.py runs it. If .gpukit is missing or its setup fails on the device, the
# check falls back to the old kernel-only stages (tests, bench_logit_stats, bench_attn_stats).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
T0=$(date +%s)
ORIG_ARGS="$*"
el() { echo $(( $(date +%s) - T0 )); }
MODE=full; STAGES=""; BUDGET=""; EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --cpu-rehearsal|--cpu) MODE=cpu ;;
        --budget) BUDGET=$2; shift ;;
        --stages) STAGES=$2; shift ;;
        tests) STAGES=tests; KERNELS_ONLY=1 ;;
        bench) STAGES=bench_logit_stats,bench_attn_stats; KERNELS_ONLY=1 ;;
        kernels) STAGES=tests,bench_logit_stats,bench_attn_stats; KERNELS_ONLY=1 ;;
        all) ;;
        -h|--help) sed -n '2,60p' "$0"; exit 0 ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done
KERNELS_ONLY=${KERNELS_ONLY:-0}
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
SITE=${GPUKIT_SITE:-/tmp/site}
PY=${PYTHON:-python3}
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DIGEST=$(cat $(find entropix_vllm triton_kernels scripts/gpukit -name '*.py' 2>/dev/null | LC_ALL=C sort) 2>/dev/null | sha256sum | cut -c1-12)

if [ "$MODE" != cpu ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "[gpu_check] no CUDA device visible to $PY: running the CPU rehearsal instead"
    MODE=cpu
fi
case "$MODE" in
    full) TOTAL=${GPU_CHECK_BUDGET_S:-540} ;;
    quick) TOTAL=${GPU_CHECK_BUDGET_S:-230} ;;
    cpu) TOTAL=${GPU_CHECK_BUDGET_S:-900}; PY=${PYTHON:-$ROOT/.venv/bin/python} ;;
esac
[ -n "$BUDGET" ] && TOTAL=$BUDGET
{
    echo "== gpu_check $MODE: $(date -u +%FT%TZ), commit $COMMIT, source digest $DIGEST, budget ${TOTAL} s, OUT=$OUT"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
    "$PY" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/check.log"

SETUP="SKIP (CPU rehearsal: the .venv's vLLM and editable plugin)"
if [ "$MODE" != cpu ] && [ "$KERNELS_ONLY" = 0 ]; then
    t=$(date +%s)
    timeout -k 5 150 "$PY" scripts/gpukit/device_setup.py --kit "$ROOT/.gpukit" --site "$SITE" > "$OUT/setup.log" 2>&1
    rc=$?
    tail -4 "$OUT/setup.log"
    if [ $rc -eq 0 ]; then
        SETUP="PASS ($(( $(date +%s) - t )) s) $SITE ready"
        export PYTHONPATH=$SITE
    else
        SETUP="FAIL (exit $rc after $(( $(date +%s) - t )) s; setup.log): $(grep -m1 'SETUP FAILED' "$OUT/setup.log" | cut -c1-300)"
        echo "[gpu_check] setup failed: running the kernel stages only (no vLLM)"
        STAGES=tests,bench_logit_stats,bench_attn_stats
        unset PYTHONPATH
    fi
elif [ "$KERNELS_ONLY" = 1 ]; then
    SETUP="SKIP (kernel stages only: no vLLM needed)"
    unset PYTHONPATH
fi
echo "[gpu_check] setup: $SETUP" | tee -a "$OUT/check.log"
LEFT=$(( TOTAL - $(el) - 5 ))
ARGS=(--mode "$MODE" --budget "$LEFT" --out "$OUT" --kit "$ROOT/.gpukit" --python "$PY"
      --setup "$SETUP" --commit "$COMMIT (source digest $DIGEST)" --command "bash scripts/gpu_check.sh $ORIG_ARGS")
[ -n "$STAGES" ] && ARGS+=(--stages "$STAGES")
# check.py ends itself within --budget; the timeout only guards against a hang (SIGTERM: it
# writes the summary and exits 124)
# writes the brief (one line per verdict and figure) to stdout at the end; progress: check.log
timeout -k 10 $(( LEFT + 20 )) "$PY" -u scripts/gpukit/check.py --quiet "${ARGS[@]}" "${EXTRA[@]}"
rc=$?
[ -f "$OUT/summary.md" ] || echo "(no summary.md: see check.log)"
echo "[gpu_check] exit $rc after $(el) s; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
