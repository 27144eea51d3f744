#!/usr/bin/env bash
# Build, test and benchmark on a GPU box in one go; results land under $OUT (default: benchmarks/results/gpu).
#
# With the device tool (no network there, torch preinstalled): copy the seed's data into the git-ignored .data/
# and carry it:   mkdir -p .data && cp ../shared/data/names.txt .data/
#                 run(command="bash benchmarks/gpu_run.sh", carry=[".data"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CHARMLP_CUDA=1
[ -f .data/names.txt ] && export CHARMLP_NAMES_TXT=$PWD/.data/names.txt
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
# Only this GPU's architecture: a quicker build on the box.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
time python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee "$OUT/build.txt"
python -m pytest -q -rs -x tests 2>&1 | tee "$OUT/tests.txt" | tail -40
python benchmarks/bench_ops.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_ops.txt"
python benchmarks/bench_train.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_train.txt"
