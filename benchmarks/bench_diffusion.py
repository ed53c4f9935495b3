"""Masked-diffusion decoding on `builtin:tiny-mdm`: the tuned policy against the one-token-per-forward baseline
(the `dense` row) and the LLaDA / Fast-dLLM / AdaBlock presets, side by side in one process.

    python -m tuner.cli tune --model builtin:tiny-mdm --techniques diffusion_blocks --objective tokens_per_s \
        --budget 20 --out /tmp/mdm-policies
    python benchmarks/bench_diffusion.py /tmp/mdm-policies/builtin-tiny-mdm/cpu-*.yaml --examples 50

Runs `autotune bench` (`tuner.bench.run_bench`: interleaved repeats, medians, the same quality harness as
tuning) and prints a Markdown table for `benchmarks/RESULTS.md`: decode tokens/s, its ratio to dense and to
the Fast-dLLM preset, end-to-end latency, model forwards per generated token and task accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from policies import load_policy_file
from tuner.bench import run_bench
from tuner.quality import QualityConfig
from tuner.workload import Workload


def table(document: dict) -> str:
    rows = document["results"]
    by_name = {r["name"]: r for r in rows}
    dense, fast = by_name["dense"], by_name.get("preset:fast-dllm")
    lines = ["| variant | decode tok/s | vs dense | vs Fast-dLLM | latency ms | forwards/token | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_fast = f"{r['tokens_per_s'] / fast['tokens_per_s']:.2f}x" if fast else "-"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | "
                     f"{vs_fast} | {r['latency_ms']:.1f} | {r['forwards_per_token']} | {r['quality']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", type=Path)
    ap.add_argument("--model", default="builtin:tiny-mdm")
    ap.add_argument("--examples", type=int, default=50, help="examples per task (needle, pattern)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the bench document here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    policy = load_policy_file(args.policy)
    document = run_bench(args.model, policy, None, Workload.from_policy(policy), repeats=args.repeats,
                         quality=QualityConfig(tasks=("needle", "pattern"), examples_per_task=args.examples),
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    print(f"{document['model']} on {document['device']['id']} ({torch.get_num_threads()} threads), "
          f"workload {document['workload']}, {args.repeats} interleaved repeats (medians)\n")
    print(table(document))


if __name__ == "__main__":
    main()
