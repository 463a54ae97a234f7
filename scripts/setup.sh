#!/usr/bin/env bash
# Idempotent set-up, run by both README commands and by CI:
#   .venv/ with mnist_lit and its dev tools (reinstalled only when pyproject.toml changes), and
#   data/MNIST/raw/ filled from a local copy of MNIST when one exists (MNIST_SOURCE, default
#   ../shared/datasets/mnist); elsewhere `fit` downloads it through torchvision on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.mnist_lit-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$wanted" > "$stamp"
fi

source_dir=${MNIST_SOURCE:-../shared/datasets/mnist}
if [ -d "$source_dir" ]; then
  mkdir -p data/MNIST/raw
  for f in "$source_dir"/*-ubyte.gz; do
    [ -e "data/MNIST/raw/$(basename "$f")" ] || cp "$f" data/MNIST/raw/
  done
fi
