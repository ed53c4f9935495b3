#!/usr/bin/env bash
# Install autotune and its dependencies into the current Python environment.
# torch==2.13.0 first: it is the local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev]"
