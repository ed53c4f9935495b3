#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): the CUDA paths CI never runs, in <= 8 minutes.
#   On the lent GPU machine (from the repository root; its python3 has torch with CUDA but not our
#   dependencies, and no package index): first, here, `bash benchmarks/gpu_wheels.sh` fetches the wheels it
#   lacks into .whl/; then run, with `.whl` carried:
#     bash benchmarks/gpu_check.sh --out "$OUT"
#   On a CPU machine (CI, tests): bash benchmarks/gpu_check.sh --dry-run --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
# Carried wheels (benchmarks/gpu_wheels.sh) are for the GPU machine only: elsewhere this environment is used as is.
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$CUDA" = 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    >"$SITE.log" 2>&1 || { cat "$SITE.log" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
