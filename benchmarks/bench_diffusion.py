"""Masked-diffusion decoding on `builtin:tiny-mdm`: the tuned policy against the one-token-per-forward baseline
(the `dense` row) and the LLaDA / Fast-dLLM / AdaBlock presets, side by side in one process.

    python -m tuner.cli tune --model builtin:tiny-mdm --techniques diffusion_blocks --objective tokens_per_s \
        --budget 20 --out /tmp/mdm-policies
    python benchmarks/bench_diffusion.py /tmp/mdm-policies/builtin-tiny-mdm/cpu-*.yaml --examples 50

Runs `autotune bench` (`tuner.bench.run_bench`: interleaved repeats, medians, the same quality harness as
tuning) and prints a Markdown table for `benchmarks/RESULTS.md`: decode tokens/s, its ratio to dense and to
the Fast-dLLM preset, end-to-end latency, model forwards per generated token and task accuracy; then, per
variant, accuracy on a held-out draw of the tasks (seed 777, not the tuner's 1234) and forwards per token on
the task prompts.
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


def held_out_quality(model_spec: str, policy, examples: int, seed: int) -> dict[str, dict[str, float]]:
    """Per variant, accuracy on a held-out draw of the tasks (another seed than the tuner's, so a policy chosen
    on the tuner's examples is not scored on them again) and forwards per generated token on those task
    prompts (short answers, then EOS padding; the timing rows use a code prompt)."""
    from policies import apply_policy, model_fingerprint, policy_from_dict, policy_to_dict
    from search_spaces import SearchContext, get_search_space
    from tuner.models import load_model
    from tuner.tasks import get_task

    loaded = load_model(model_spec)
    tok = loaded.tokenizer
    ctx = SearchContext(model_fingerprint=model_fingerprint(loaded.model), workload={}, device={},
                        model=loaded.model, tokenizer=tok)
    base = policy_to_dict(policy)
    variants = {"dense": None, "policy": policy}
    for preset in get_search_space("diffusion_blocks").presets(ctx):
        variants[f"preset:{preset.name}"] = policy_from_dict(
            dict(base, techniques={"diffusion_blocks": preset.section}))
    out: dict[str, dict[str, float]] = {}
    for name, variant in variants.items():
        forwards = tokens = 0
        accuracy = {}
        with apply_policy(loaded.model, variant) as handle:
            for task_name in ("needle", "pattern"):
                task = get_task(task_name)
                hits = 0.0
                for example in task.examples(examples, seed=seed):
                    ids = tok(example.prompt, return_tensors="pt").input_ids
                    generated = handle.generate(ids, max_new_tokens=task.max_new_tokens)
                    hits += task.score(tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True),
                                       example.answer)
                    forwards += handle.decode_owner.last_stats.forwards
                    tokens += task.max_new_tokens
                accuracy[task_name] = 100.0 * hits / examples
        out[name] = {"held_out_accuracy": sum(accuracy.values()) / len(accuracy), **accuracy,
                     "task_forwards_per_token": forwards / tokens}
    return out


def cache_cost(model_spec: str, section: dict, examples: int, seed: int) -> dict[str, dict[str, float]]:
    """The block cache's quality cost: `section` decoded with cache none / prefix / dual on the same held-out
    examples; accuracy per task and how many generations equal the uncached ones."""
    from policies.diffusion_blocks import DiffusionConfig, diffusion_generate
    from tuner.models import load_model
    from tuner.tasks import get_task

    loaded = load_model(model_spec)
    tok = loaded.tokenizer
    prompts = {t: [(tok(e.prompt, return_tensors="pt").input_ids, e) for e in get_task(t).examples(examples, seed)]
               for t in ("needle", "pattern")}
    uncached: dict[tuple[str, int], list[int]] = {}
    out: dict[str, dict[str, float]] = {}
    for cache in ("none", "prefix", "dual"):
        cfg = DiffusionConfig.from_section({**section, "cache": cache})
        row: dict[str, float] = {"identical": 0}
        for name, items in prompts.items():
            task, hits = get_task(name), 0.0
            for i, (ids, example) in enumerate(items):
                generated = diffusion_generate(loaded.model, ids, task.max_new_tokens, cfg)[0, ids.shape[1]:].tolist()
                uncached.setdefault((name, i), generated)
                row["identical"] += generated == uncached[(name, i)]
                hits += task.score(tok.decode(generated, skip_special_tokens=True), example.answer)
            row[name] = 100.0 * hits / examples
        out[cache] = row
    return out


def table(document: dict) -> str:
    rows = document["results"]
    by_name = {r["name"]: r for r in rows}
    dense, fast = by_name["dense"], by_name.get("preset:fast-dllm")
    side = document.get("held_out", {})
    lines = ["| variant | decode tok/s | vs dense | vs Fast-dLLM | latency ms | forwards/token (timing prompt) | "
             "accuracy (tuner's examples) | held-out accuracy (needle / pattern) | forwards/token (task prompts) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_fast = f"{r['tokens_per_s'] / fast['tokens_per_s']:.2f}x" if fast else "-"
        extra = {"held_out_accuracy": float("nan"), "needle": float("nan"), "pattern": float("nan"),
                 "task_forwards_per_token": float("nan"), **side.get(r["name"], {})}
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | "
                     f"{vs_fast} | {r['latency_ms']:.1f} | {r['forwards_per_token']} | {r['quality']:.1f} | "
                     f"{extra['held_out_accuracy']:.1f} ({extra['needle']:.0f} / {extra['pattern']:.0f}) | "
                     f"{extra['task_forwards_per_token']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", type=Path)
    ap.add_argument("--model", default="builtin:tiny-mdm")
    ap.add_argument("--examples", type=int, default=50, help="examples per task (needle, pattern)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--held-out", type=int, default=100, help="held-out examples per task (0: skip)")
    ap.add_argument("--held-out-seed", type=int, default=777, help="not the tuner's seed (1234)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="reuse the timing rows of an earlier --json document instead of re-running the bench")
    ap.add_argument("--json", type=Path, default=None, help="also write the bench document here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    policy = load_policy_file(args.policy)
    if args.from_json:
        document = json.loads(args.from_json.read_text())
    else:
        document = run_bench(args.model, policy, None, Workload.from_policy(policy), repeats=args.repeats,
                             quality=QualityConfig(tasks=("needle", "pattern"), examples_per_task=args.examples),
                             log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.held_out:
        document["held_out"] = held_out_quality(args.model, policy, args.held_out, args.held_out_seed)
    if args.held_out:
        document["cache_cost"] = {
            "fast-dllm": cache_cost(args.model, {"block_length": 32, "steps_per_block": None, "threshold": 0.9},
                                    args.held_out, args.held_out_seed),
            "policy": cache_cost(args.model, dict(policy.techniques["diffusion_blocks"]), args.held_out,
                                 args.held_out_seed)}
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    print(f"{document['model']} on {document['device']['id']} ({torch.get_num_threads()} threads), "
          f"workload {document['workload']}, {args.repeats} interleaved repeats (medians)\n")
    print(table(document))
    for name, rows in document.get("cache_cost", {}).items():
        cells = ", ".join(f"{cache}: needle {r['needle']:.0f} / pattern {r['pattern']:.0f} / identical to uncached "
                          f"{r['identical']:.0f}" for cache, r in rows.items())
        print(f"\ncache cost, {name} ({args.held_out} + {args.held_out} held-out examples): {cells}")


if __name__ == "__main__":
    main()
