#!/usr/bin/env bash
# Build, test and benchmark on a GPU box in one go; results land under $OUT (default: benchmarks/results/gpu):
# one log (environment, build, tests, benchmark tables) plus the JSON + markdown that each benchmark writes.
#
# With the device tool (no network there, torch preinstalled): copy the seed's data into the git-ignored .data/
# and carry it:   mkdir -p .data && cp ../shared/data/names.txt .data/
#                 run(command="bash benchmarks/gpu_run.sh", carry=[".data"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
export PYTHONUNBUFFERED=1 CHARMLP_CUDA=1
[ -f .data/names.txt ] && export CHARMLP_NAMES_TXT=$PWD/.data/names.txt
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
# Only this GPU's architecture: a quicker build on the box.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== build"; time python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  echo "== tests"; python -m pytest -q -rs tests 2>&1 | tail -60
  echo "== bench_ops"; python benchmarks/bench_ops.py --device cuda --out "$OUT"
  echo "== bench_train"; python benchmarks/bench_train.py --device cuda --out "$OUT"
} 2>&1 | tee "$LOG"
