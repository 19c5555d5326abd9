#!/usr/bin/env bash
# A GPU session's checks and benchmarks, in few device calls: a session has 15 device-minutes in all, the
# machine's start (a minute or more) and its idle time included.
#
# Here, once (no GPU needed; the device image has everything but diffusers), and again after a commit
# (it also writes .whl/COMMIT: .git does not travel, and the figures must name the code they measured):
#     bash bench/gpu_session.sh fetch
# Then, with the device tool, with carry [".whl"], one or more stages per call, run in order.
# With 15 minutes, make the first call `DEADLINE=420 bash bench/gpu_session.sh first` (timeout_s 480):
#     bash bench/gpu_session.sh first      # the GPU numerics tests (kernels, fast loop, CUDA graphs, csrc), then
#                                          # images/s at batch 32 for diffusers fp16 vs our graph loop (unguided,
#                                          # ManifoldGD), then the kernel tables without torch.compile
# and, with the time left (about 4 minutes), one more call on the same warm machine, started at once (an idle
# machine goes back after about 30 s, and a fresh one takes minutes to start), e.g. `DEADLINE=230 ... sampling`:
#     bash bench/gpu_session.sh sampling   # bench_sampling at batch 8 and 64, no fp32 / compile rows, JSON + PNG
#     bash bench/gpu_session.sh kernels    # bench_kernels + bench_dit_ops (--quick), CSV
#     bash bench/gpu_session.sh scale      # bench_modes + bench_cache on the GPU (SCALING.md figures)
#     bash bench/gpu_session.sh sd         # bench_sd: StableDiffusionPipeline fp16 vs our loop, SD-1.5 size
#     bash bench/gpu_session.sh compile    # (long) bench_sampling's torch.compile rows, batch 32 only
#     bash bench/gpu_session.sh tests      # (long, mostly CPU tests) every test on the GPU
# Every command runs under the call's deadline (DEADLINE seconds, default 570, below the 600 s limit) and is
# stopped with SIGINT (its clean-up and partial results run; SIGKILL 15 s later); the stages after one cut
# short say they were skipped. Only 8 files come back from $OUT: everything is written to a work folder and
# packed into $OUT/results.tgz after every command (with versions.txt and summary.txt beside it), so a call
# killed at its limit still returns what it finished. KERNELS_FLAGS=--no-compile drops the kernel tables'
# torch.compile column, which takes most of that stage's time.
# Record every figure in bench/RESULTS.md with the date, GPU, versions, commit and the command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_session.sh fetch | STAGE... (first tests kernels sampling compile scale sd)" >&2; exit 2; }
if [ "$1" = fetch ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  { git rev-parse HEAD; git status --porcelain | head -5; } > .whl/COMMIT
  v=$(python3 -c "import diffusers; print(diffusers.__version__)")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==$v"
  ls -l .whl
  exit 0
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=$(mktemp -d)      # every log and result; packed into $OUT/results.tgz after each command (8 files come back)
pack() {
  tar -C "$RES" -czf "$OUT/results.tgz.tmp" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  cp "$RES/versions.txt" "$OUT/" 2>/dev/null || true
  { cat "$RES/cut.txt" "$RES/skipped.txt" 2>/dev/null; for f in "$RES"/*.log; do [ -f "$f" ] || continue
      echo "== $(basename "$f")"; tail -n 25 "$f"; done; } > "$OUT/summary.txt" 2>/dev/null || true
}
trap pack EXIT
DEADLINE=${DEADLINE:-570}
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
  || { echo "no CUDA device here: nothing to measure" | tee "$RES/cut.txt"; exit 3; }
ls .whl/*.whl >/dev/null 2>&1 || python3 -c "import diffusers" 2>/dev/null \
  || { echo "no diffusers and no .whl/: run 'bash bench/gpu_session.sh fetch' here and carry .whl" | tee "$RES/cut.txt"; exit 2; }
KERNELS_FLAGS=${KERNELS_FLAGS:-}   # e.g. --no-compile: the kernel tables without their torch.compile column (faster)
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# the package in place (console script included); if pip cannot, the tree itself on the path
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "pip install -e . failed: using PYTHONPATH=$PWD"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
{ date -u +%Y-%m-%dT%H:%M:%SZ; echo "commit: $(cat .whl/COMMIT 2>/dev/null || echo unknown)"
  echo "command: bash bench/gpu_session.sh $* (DEADLINE=$DEADLINE)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,pstate \
      --format=csv || echo "no nvidia-smi"
  python3 -c "import sys, torch, triton, diffusers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} | tee "$RES/versions.txt"
# run "$@" under what is left of the deadline (at most CAP seconds where CAP is set); a command cut short (or
# failing) does not stop the stages after it
t() {
  local left=$((DEADLINE - SECONDS))
  if [ -n "${CAP:-}" ] && [ "$CAP" -lt "$left" ]; then left=$CAP; fi
  if [ "$left" -le 20 ]; then echo "skipped (out of time): $*" | tee -a "$RES/skipped.txt"; return 0; fi
  timeout -s INT -k 15 "$left" "$@" || echo "exit $? (124: cut at the deadline): $*" | tee -a "$RES/cut.txt"
  pack
}
for stage in "$@"; do
  echo "== stage $stage at ${SECONDS}s"
  case "$stage" in
    first)    # the tests get at most half the deadline, so that the benchmarks still run after a slow compile
              # (not load_inline: a second build of the CUDA extension in a temp folder; the GPU tests build it);
              # then the headline (images/s against diffusers), then the kernel tables with what is left
              CAP=$((DEADLINE / 2)) t python3 -m pytest -q -p no:cacheprovider -rfEs --durations=10 tests/test_kernels_triton.py \
                  tests/test_kernels_pipeline_triton.py \
                  tests/test_dit_ops_triton.py tests/test_fastloop.py tests/test_csrc.py tests/test_kernels_torch.py \
                  -k "not load_inline" 2>&1 | tee "$RES/first_tests.log"
              t python3 bench/bench_sampling.py --batches 32 --reps 2 --no-compile --json "$RES/sampling_first.json" \
                  --rows diffusers-fp16 ours-graph-dit ours-graph-manifoldgd ours-graph-fused-tattn-manifoldgd \
                  2>&1 | tee "$RES/sampling_first.log"
              t python3 bench/bench_kernels.py --quick --no-compile --csv "$RES/kernels.csv" \
                  2>&1 | tee "$RES/kernels.log" ;;
    tests)    t python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 tests 2>&1 | tee "$RES/tests.log" ;;
    kernels)  t python3 bench/bench_dit_ops.py --quick $KERNELS_FLAGS --csv "$RES/dit_ops.csv" 2>&1 | tee "$RES/dit_ops.log"
              t python3 bench/bench_kernels.py --quick $KERNELS_FLAGS --csv "$RES/kernels.csv" 2>&1 | tee "$RES/kernels.log" ;;
    sampling) t python3 bench/bench_sampling.py --batches 8 64 --no-compile --reps 3 \
                  --json "$RES/sampling.json" --png "$RES/sampling.png" \
                  --rows diffusers-fp16 ours-reference-dit ours-graph-dit ours-graph-fused-dit ours-graph-fused-tattn-dit \
                         ours-graph-mgd3 ours-graph-manifoldgd ours-graph-fused-manifoldgd ours-graph-fused-tattn-manifoldgd \
                  2>&1 | tee "$RES/sampling.log" ;;
    compile)  t python3 bench/bench_sampling.py --batches 32 --reps 3 --json "$RES/sampling_compile.json" \
                  --rows diffusers-fp16 diffusers-fp16-compile ours-graph-manifoldgd ours-graph-compile-manifoldgd \
                         ours-graph-fused-manifoldgd ours-graph-compile-fused-manifoldgd 2>&1 | tee "$RES/compile.log" ;;
    scale)    t python3 bench/bench_modes.py --device cuda 2>&1 | tee "$RES/modes.log"
              t python3 bench/bench_cache.py --vae sd --device cuda --dtype bfloat16 --n 1024 --workers 0 4 8 2>&1 | tee "$RES/cache.log" ;;
    sd)       t python3 bench/bench_sd.py --batch 8 --csv "$RES/sd.csv" 2>&1 | tee "$RES/sd.log" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
