#!/usr/bin/env bash
# Build, test and benchmark on a GPU box; results land under $OUT (default: benchmarks/results/gpu): one log
# (environment, build, tests, benchmark tables) plus the JSON + markdown that each benchmark writes.
#
#   bash benchmarks/gpu_run.sh PHASE...      PHASE: test | ops[:SIZES] | train | sweep
#                                            (default: test ops:seed train sweep)
#
#   test          the whole suite (the CUDA tests included)
#   ops:SIZES     bench_ops.py at the comma-separated sizes (seed, big, word, vocab; default all)
#   train         bench_train.py: the seed's 200,000 steps for the fast implementations; eager and compile
#                 timed on 20,000 steps and extrapolated (--baseline-steps)
#   sweep         bench_sweep.py: M = 1, 8, 32, 128 seed-size models x 200,000 steps in one persistent launch each,
#                 against one model at a time and torch.func in one CUDA graph
#
# The extension is built first (pip install -e ., for this GPU's architecture only). Every phase runs under one
# deadline (DEADLINE_S seconds from the start, default 560), so that a run bounded in time still writes its log and
# the results of the phases it finished; a phase cut off by the deadline says so in the log.
#
# Data: the seed's names.txt is read from .data/names.txt when present (a machine without ../shared/data), e.g.
#     mkdir -p .data && cp ../shared/data/names.txt .data/
#     bash benchmarks/gpu_run.sh test ops:seed
#     OUT=/tmp/gpu DEADLINE_S=3000 bash benchmarks/gpu_run.sh ops:big,word,vocab train
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
DEADLINE=$((SECONDS + ${DEADLINE_S:-560}))
export PYTHONUNBUFFERED=1 CHARMLP_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
[ -f .data/names.txt ] && export CHARMLP_NAMES_TXT=$PWD/.data/names.txt
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
# Only this GPU's architecture: a quicker build on the box.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
[ $# -gt 0 ] || set -- test ops:seed train sweep

# Run a command with what is left of the deadline.
bounded() {
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -le 10 ]; then echo "(skipped: the deadline has passed)"; return 124; fi
  timeout "$left" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "(cut off by the deadline)"
  return "$rc"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== build"
  bounded python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  for phase in "$@"; do
    echo "== $phase ($((DEADLINE - SECONDS)) s left)"
    case "$phase" in
      test) bounded python -m pytest -q -rs tests 2>&1 | tail -80 ;;
      ops | ops:*) sizes=${phase#ops}; sizes=${sizes#:}
                   bounded python benchmarks/bench_ops.py --device cuda ${sizes:+--sizes "$sizes"} --out "$OUT" ;;
      train) bounded python benchmarks/bench_train.py --device cuda --baseline-steps 20000 --out "$OUT" ;;
      sweep) bounded python benchmarks/bench_sweep.py --device cuda --max-seconds 20 --out "$OUT" ;;
      *) echo "unknown phase $phase (test, ops[:SIZES], train, sweep)" ;;
    esac
  done
} 2>&1 | tee "$LOG"
