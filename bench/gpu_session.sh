#!/usr/bin/env bash
# A GPU session's checks and benchmarks, in few device calls: a session has 15 device-minutes in all, the
# machine's start (a minute or more) and its idle time included.
#
# Here, once (no GPU needed; the device image has everything but diffusers):
#     bash bench/gpu_session.sh fetch
# Then, with the device tool, with carry [".whl"], one or more stages per call, run in order.
# With 15 minutes, make the first call `DEADLINE=420 bash bench/gpu_session.sh first` (timeout_s 480):
#     bash bench/gpu_session.sh first      # the GPU numerics tests (kernels, fast loop, CUDA graphs, csrc),
#                                          # the kernel tables without torch.compile, and images/s at batch 32
#                                          # for diffusers fp16 vs our graph loop (unguided, ManifoldGD)
# and, with time left, the other stages on the same warm machine:
#     bash bench/gpu_session.sh tests      # every test on the GPU (CUDA-only tests included), log to $OUT
#     bash bench/gpu_session.sh kernels    # bench_kernels + bench_dit_ops (--quick), CSV to $OUT
#     bash bench/gpu_session.sh sampling   # bench_sampling (no compile rows), JSON + PNG chart to $OUT
#     bash bench/gpu_session.sh compile    # bench_sampling's torch.compile rows, batch 32 only
#     bash bench/gpu_session.sh scale      # bench_modes + bench_cache on the GPU (SCALING.md figures)
#     bash bench/gpu_session.sh sd         # bench_sd: StableDiffusionPipeline fp16 vs our loop, SD-1.5 size
# A machine left idle goes back within a minute and a fresh one takes minutes to start, so group the
# stages into few calls, e.g. `tests kernels`, then `sampling compile`, then `scale sd`. Every command
# runs under the call's deadline (DEADLINE seconds, default 570, below the 600 s limit): one cut short
# still leaves its log in $OUT, and the stages after it say they were skipped. KERNELS_FLAGS=--no-compile
# drops the kernel tables' torch.compile column, which takes most of that stage's time.
# Record every figure in bench/RESULTS.md with the date, GPU, versions and the command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_session.sh fetch | STAGE... (first tests kernels sampling compile scale sd)" >&2; exit 2; }
if [ "$1" = fetch ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  v=$(python3 -c "import diffusers; print(diffusers.__version__)")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==$v"
  ls -l .whl
  exit 0
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-570}
KERNELS_FLAGS=${KERNELS_FLAGS:-}   # e.g. --no-compile: the kernel tables without their torch.compile column (faster)
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# the package in place (console script included); if pip cannot, the tree itself on the path
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "pip install -e . failed: using PYTHONPATH=$PWD"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} | tee "$OUT/versions.txt"
# run "$@" under what is left of the deadline (at most CAP seconds where CAP is set); a command cut short (or
# failing) does not stop the stages after it
t() {
  local left=$((DEADLINE - SECONDS))
  if [ -n "${CAP:-}" ] && [ "$CAP" -lt "$left" ]; then left=$CAP; fi
  if [ "$left" -le 20 ]; then echo "skipped (out of time): $*" | tee -a "$OUT/skipped.txt"; return 0; fi
  timeout "$left" "$@" || echo "exit $? (124: cut at the deadline): $*" | tee -a "$OUT/cut.txt"
}
for stage in "$@"; do
  echo "== stage $stage at ${SECONDS}s"
  case "$stage" in
    first)    # the tests get at most half the deadline, so that the benchmarks still run after a slow compile
              # (not load_inline: a second build of the CUDA extension in a temp folder; the GPU tests build it)
              CAP=$((DEADLINE / 2)) t python3 -m pytest -q -p no:cacheprovider -rfEs --durations=10 tests/test_kernels_triton.py \
                  tests/test_kernels_pipeline_triton.py \
                  tests/test_dit_ops_triton.py tests/test_fastloop.py tests/test_csrc.py tests/test_kernels_torch.py \
                  -k "not load_inline" 2>&1 | tee "$OUT/first_tests.log"
              CAP=$((DEADLINE / 4)) t python3 bench/bench_kernels.py --quick --no-compile --csv "$OUT/kernels.csv" \
                  2>&1 | tee "$OUT/kernels.log"
              t python3 bench/bench_sampling.py --batches 32 --reps 2 --no-compile --json "$OUT/sampling_first.json" \
                  --rows diffusers-fp16 ours-graph-dit ours-graph-manifoldgd ours-graph-fused-tattn-manifoldgd \
                  2>&1 | tee "$OUT/sampling_first.log" ;;
    tests)    t python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 tests 2>&1 | tee "$OUT/tests.log" ;;
    kernels)  t python3 bench/bench_dit_ops.py --quick $KERNELS_FLAGS --csv "$OUT/dit_ops.csv" 2>&1 | tee "$OUT/dit_ops.log"
              t python3 bench/bench_kernels.py --quick $KERNELS_FLAGS --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/kernels.log" ;;
    sampling) t python3 bench/bench_sampling.py --batches 8 32 128 --no-compile --reps 3 \
                  --json "$OUT/sampling.json" --png "$OUT/sampling.png" 2>&1 | tee "$OUT/sampling.log" ;;
    compile)  t python3 bench/bench_sampling.py --batches 32 --reps 3 --json "$OUT/sampling_compile.json" \
                  --rows diffusers-fp16 diffusers-fp16-compile ours-graph-manifoldgd ours-graph-compile-manifoldgd \
                         ours-graph-fused-manifoldgd ours-graph-compile-fused-manifoldgd 2>&1 | tee "$OUT/compile.log" ;;
    scale)    t python3 bench/bench_modes.py --device cuda 2>&1 | tee "$OUT/modes.log"
              t python3 bench/bench_cache.py --vae sd --device cuda --dtype bfloat16 2>&1 | tee "$OUT/cache.log" ;;
    sd)       t python3 bench/bench_sd.py --batch 8 --csv "$OUT/sd.csv" 2>&1 | tee "$OUT/sd.log" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
