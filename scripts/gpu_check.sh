#!/usr/bin/env bash
# The device check, prepared to fit one call of a lent GPU machine (torch and
# Triton there, no vLLM, nothing installed): the Triton kernel tests on the
# GPU, then the logit-statistics and attention-statistics benchmarks. Every
# log goes to $OUT (the device tool's folder; ./gpu_out otherwise).
#
#   bash scripts/gpu_check.sh            # tests + both benchmarks (about 8 min on an H100)
#   bash scripts/gpu_check.sh tests      # only the tests
#   bash scripts/gpu_check.sh bench      # only the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
what=${1:-all}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA', torch.version.cuda, 'python', platform.python_version())"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
rc=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  xdist=""
  python -c "import xdist" 2>/dev/null && xdist="-n 8"
  timeout 240 python -m pytest -q -p no:cacheprovider $xdist \
    tests/test_triton_logit_stats.py tests/test_candidate_sampling.py tests/test_decide.py \
    tests/test_triton_attn_stats.py \
    2>&1 | tee "$OUT/tests.log" | tail -15
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  timeout 240 python benchmarks/bench_logit_stats.py --dtypes float32,bfloat16 \
    --batches 1,8,64,256,1024 --vocabs 32000,128256,151936,256000 --rep 30 \
    > "$OUT/bench_logit_stats.md" 2> "$OUT/bench_logit_stats.err"
  echo "bench_logit_stats exit $?"; cat "$OUT/bench_logit_stats.md"
  timeout 150 python benchmarks/bench_attn_stats.py --graph --rep 50 \
    > "$OUT/bench_attn_stats.md" 2> "$OUT/bench_attn_stats.err"
  echo "bench_attn_stats exit $?"; cat "$OUT/bench_attn_stats.md"
fi
exit $rc
