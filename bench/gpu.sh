#!/usr/bin/env bash
# One GPU machine, under 10 minutes: the gpu-marked tests, then the attention-backend benchmark (and the Ulysses
# overlap benchmark, which needs 2 GPUs: with one it prints that it measured nothing).
#
#   bash bench/gpu.sh                 # from the repository root (or anywhere: it cd's there)
#   PYTHON=python3 bash bench/gpu.sh  # another interpreter than .venv/bin/python
#
# Each part has its own time limit (TESTS_S=330 s, BENCH_S=90 s per benchmark run: under 9 minutes in all); a part that
# fails or times out is reported and the next still runs; the exit status is non-zero when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TESTS_S="${TESTS_S:-330}"
BENCH_S="${BENCH_S:-90}"
status=0

"$PYTHON" - <<'PY' || { echo "no CUDA device: nothing to run"; exit 1; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"

echo "== gpu-marked tests (limit ${TESTS_S}s)"
start=$SECONDS
timeout --kill-after=10 "$TESTS_S" "$PYTHON" -m pytest -q -m gpu -rs tests/ || { echo "gpu tests: FAILED (rc $?)"; status=1; }
echo "gpu tests: $((SECONDS - start)) s"

echo "== attention backends, one device (limit ${BENCH_S}s)"
start=$SECONDS
timeout --kill-after=10 "$BENCH_S" "$PYTHON" bench/attention_backends.py || { echo "benchmark: FAILED (rc $?)"; status=1; }
timeout --kill-after=10 "$BENCH_S" "$PYTHON" bench/attention_backends.py --tokens 16384 --reps 5 \
    || { echo "benchmark (16k tokens): FAILED (rc $?)"; status=1; }
timeout --kill-after=10 "$BENCH_S" "$PYTHON" bench/ulysses_overlap.py --backend nccl --tokens 16384 --dtype bfloat16 --workloads attention || { echo "ulysses overlap (2 GPUs): FAILED (rc $?)"; status=1; }
echo "benchmarks: $((SECONDS - start)) s"
exit $status
