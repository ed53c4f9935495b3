"""Token retention end to end: tune a per-device policy, then bench it against dense and the paper presets.

The claim under test (issue "Token-retention schedules"): on `builtin:tiny`, retrieval (needle) prompts of >= 2k
tokens, the tuned policy's TTFT is >= 1.8x faster than dense with <= 1 point accuracy loss, and at equal
or better accuracy >= 1.15x faster than the best of the FastV / p-MoD / PyramidDrop presets.

1. `tune`: objective TTFT, quality = exact-match accuracy on `needle-2k` (budget 1 point), the three
   presets enqueued first, the rest sampled by TPE; the cost model's error on every measured trial.
2. `bench`: dense, the tuned policy and the presets in one process, interleaved repeats, medians, with
   accuracy on a held-out seed (not the tuning examples) and the KV-cache size after prefill.
Prints Markdown tables ready for benchmarks/RESULTS.md.

    python benchmarks/bench_token_retention.py [--budget 30] [--examples 40] [--out bench-out/tr]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from policies import load_policy_file  # noqa: E402
from tuner.bench import run_bench  # noqa: E402
from tuner.quality import QualityConfig  # noqa: E402
from tuner.tune import TuneConfig, tune  # noqa: E402
from tuner.workload import Workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--examples", type=int, default=40, help="needle-2k examples scored per variant")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--out", default="bench-out/token-retention")
    args = ap.parse_args()

    workload = Workload(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    tune_quality = QualityConfig(tasks=("needle-2k",), examples_per_task=args.examples, free_text_samples=0,
                                 seed=1234)
    result = tune(TuneConfig(model=args.model, techniques=("token_retention",), budget=args.budget,
                             quality_budget=1.0, quality_metric="accuracy", objective="ttft_ms",
                             out_dir=Path(args.out), sampler=args.sampler, workload=workload, quality=tune_quality,
                             repeats=3), log=lambda m: print(m, file=sys.stderr, flush=True))
    policy = load_policy_file(result.policy_path)
    held_out = QualityConfig(tasks=("needle-2k",), examples_per_task=args.examples, free_text_samples=0,
                             seed=98765)
    doc = run_bench(args.model, policy, workload=workload, repeats=args.repeats, quality=held_out,
                    log=lambda m: print(m, file=sys.stderr, flush=True))

    print(f"\n### Token retention on {doc['device']['name']} ({doc['device']['id']}), "
          f"{dt.date.today().isoformat()}\n")
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, {args.repeats} interleaved repeats (medians); accuracy on "
          f"{args.examples} held-out needle-2k examples.\n")
    print("| variant | keep schedule | TTFT ms | TTFT speed-up | latency ms | KV cache MiB | accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    sections = {"policy": policy.techniques.get("token_retention", {})}
    dense = doc["results"][0]
    for row in doc["results"]:
        keep = sections.get(row["name"], {}).get("keep") if row["name"] == "policy" else None
        print(f"| {row['name']} | {keep if keep else ''} | {row['ttft_ms']:.1f} | "
              f"{dense['ttft_ms'] / row['ttft_ms']:.2f}x | {row['latency_ms']:.1f} | "
              f"{row['kv_cache_mb']:.2f} | {row['quality']:.1f} |")
    presets = [r for r in doc["results"] if r["name"].startswith("preset:")]
    tuned = next(r for r in doc["results"] if r["name"] == "policy")
    peers = [r for r in presets if r["quality"] <= tuned["quality"]]
    if peers:
        best = min(peers, key=lambda r: r["ttft_ms"])
        print(f"\nTuned vs best preset at equal or lower accuracy ({best['name']}): "
              f"{best['ttft_ms'] / tuned['ttft_ms']:.2f}x TTFT.")
    prov = policy.provenance
    extra = getattr(prov, "extra", {}) or {}
    print(f"Cost model median |error| over measured trials: {extra.get('cost_model_median_abs_error')} "
          f"({extra.get('cost_model_measured_trials')} trials); policy {result.policy_path}, trial "
          f"{result.best_trial} of {result.n_trials}, budget met: {result.budget_met}.")


if __name__ == "__main__":
    main()
