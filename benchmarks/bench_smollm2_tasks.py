"""Dense quality of builtin:smollm2-135m on the passkey tasks, with 95% Wilson intervals (issue 14's baseline).

    python benchmarks/bench_smollm2_tasks.py [--tasks passkey,passkey-2k] [--examples 50] [--threads 2]

Greedy, chat template applied, fp32; prints one row per task (accuracy, interval, examples, seconds) and the
mean prompt length in tokens. This is the number every token-reduction policy on this model is held to.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tuner.models import load_model
from tuner.quality import QualityConfig, QualityHarness
from tuner.tasks import get_task, prompt_ids


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials, in percent."""
    if n == 0:
        return 0.0, 100.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="passkey,passkey-2k")
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("builtin:smollm2-135m")
    print("| task | dense accuracy | 95% interval | examples | mean prompt tokens | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        started = time.perf_counter()
        config = QualityConfig(tasks=(name,), examples_per_task=args.examples, free_text_samples=0)
        report = QualityHarness(loaded.model, loaded.tokenizer, config).reference()
        seconds = time.perf_counter() - started
        task = get_task(name)
        lengths = [prompt_ids(loaded.tokenizer, e.prompt, chat=task.chat).shape[1]
                   for e in task.examples(args.examples, seed=config.seed)]
        k = round(report.task_accuracy[name] * args.examples / 100)
        lo, hi = wilson(k, args.examples)
        print(f"| {name} | {report.task_accuracy[name]:.1f}% | {lo:.1f}-{hi:.1f}% | {args.examples} | "
              f"{sum(lengths) / len(lengths):.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
