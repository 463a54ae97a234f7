#!/usr/bin/env bash
# The GPU checks in one go (~4 minutes on one H200): the GPU-marked tests, a bf16-mixed fit of the
# default config on real MNIST, and the benchmark (1 repeat). Run after `bash scripts/setup.sh` on a
# machine with CUDA; MNIST_SOURCE names the folder with the four *-ubyte.gz files. Output goes to
# $OUT (default ./gpu_check_out): tests.txt, fit.txt, benchmark.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
source_dir=${MNIST_SOURCE:-../shared/datasets/mnist}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"

"$py" -m pytest -m gpu -v -s 2>&1 | tee "$out/tests.txt"

data=$(mktemp -d)
mkdir -p "$data/MNIST/raw" && cp "$source_dir"/*-ubyte.gz "$data/MNIST/raw/"
/usr/bin/time -f "fit wall %e s" "$py" -m mnist_lit fit --config configs/default.yaml \
  --trainer configs/trainer/gpu.yaml --trainer.precision bf16-mixed --data.data_dir "$data" \
  --data.download false --trainer.logger.init_args.save_dir "$data/logs" --trainer.enable_progress_bar false \
  2>&1 | tee "$out/fit.txt"

"$py" scripts/measure/benchmark.py --mnist "$source_dir" --repeats 1 --no-extras 2>&1 | tee "$out/benchmark.txt"
