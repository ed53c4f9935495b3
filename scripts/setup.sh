#!/usr/bin/env bash
# Install autotune and the exact versions of everything it needs (the lock) into the current Python
# environment; LOCK=requirements-oldest.lock installs the oldest supported transformers instead.
# torch==2.13.0 first: it is the local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=${LOCK:-requirements.lock}
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -r "$LOCK"
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -m pip check
