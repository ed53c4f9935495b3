#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels the GPU machine's Python 3.12 lacks for benchmarks/gpu_check.sh:
# its image has torch (CUDA), numpy, pandas, pyarrow, matplotlib, scipy, tokenizers, safetensors, hub and
# nvidia-ml-py, but an older transformers and no Optuna. Versions are the lock's.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
pin() { grep -iE "^$1==" requirements.lock; }
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "$(pin transformers)" "$(pin optuna)" "$(pin alembic)" "$(pin mako)" "$(pin colorlog)" "$(pin sqlalchemy)" \
  "$(pin tabulate)"
ls -la .whl
