#!/usr/bin/env bash
# The demo: install, then profile builtin:tiny on this device, bench it and render a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-demo-out}
mkdir -p "$OUT"
set -x
autotune devices
autotune models
autotune profile --model builtin:tiny --tokens 1024 --out "$OUT/profile"
autotune profile --model builtin:tiny --mode decode --tokens 1024
autotune bench --model builtin:tiny --prompt-tokens 1024 --new-tokens 16 --repeats 3 --json > "$OUT/bench-dense.json"
autotune report "$OUT/profile"
set +x
echo "demo done: $OUT/profile/report.html, $OUT/bench-dense.json"
