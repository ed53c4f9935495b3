#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels the GPU machine's Python 3.12 lacks for benchmarks/gpu_check.sh:
# its image has torch (CUDA), numpy, pandas, pyarrow, matplotlib, scipy, tokenizers, safetensors, hub and
# nvidia-ml-py, but an older transformers and no Optuna. Versions are the lock's.
# (Its huggingface_hub 1.x, tokenizers 0.23 and safetensors 0.8 satisfy transformers 5.24's requirements.)
# .whl/ is in .gitignore; name it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=()
for name in transformers optuna alembic mako colorlog sqlalchemy tabulate; do
  line=$(grep -iE "^$name==" requirements.lock) || { echo "gpu_wheels: $name is not in requirements.lock" >&2; exit 2; }
  PINS+=("$line")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "${PINS[@]}"
ls -la .whl
