"""Hardware awareness of speculative tuning: each device's own policy against the other device's, on both.

Two "devices" on this machine: the same CPU at 1 and at 2 torch threads (`--device cpu:1t` / `cpu:2t`, two
device ids with their own verify curves and policies). Tune one policy per device first, e.g.

    autotune tune --techniques speculative --objective tokens_per_s --new-tokens 64 --device cpu:1t --out P
    autotune tune --techniques speculative --objective tokens_per_s --new-tokens 64 --device cpu:2t --out P

then this script runs, at each thread count, dense and every policy in the store, and also the Sequoia
hardware seed each study chose (the `sequoia-hw` preset trial: the DP tree whose size the device's own
verify curve picked), with interleaved repeats (medians). It prints decode tokens/s per (device, variant).

    python benchmarks/bench_speculative_devices.py --store P/builtin-tiny [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from policies import apply_policy, load_policy_file, policy_to_dict  # noqa: E402
from profilers.device import use_cpu_threads  # noqa: E402
from tuner.measure import time_generate  # noqa: E402
from tuner.models import load_model  # noqa: E402
from tuner.workload import timing_input_ids  # noqa: E402


def sequoia_seed_section(trials_csv: Path) -> dict | None:
    """The section of the study's `sequoia-hw` preset trial, if it ran."""
    import pandas as pd

    frame = pd.read_csv(trials_csv)
    rows = frame[frame["preset"] == "speculative:sequoia-hw"]
    return None if rows.empty else json.loads(rows.iloc[0]["sections"])["speculative"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, type=Path, help="directory holding <device-id>.yaml policies")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    loaded = load_model("builtin:tiny")
    model = loaded.model
    variants: dict[str, dict | None] = {"dense": None}
    for path in sorted(args.store.glob("*.yaml")):
        doc = policy_to_dict(load_policy_file(path))
        tag = path.stem.rsplit("-", 1)[-1]
        variants[f"policy tuned on {tag}"] = doc
        seed = sequoia_seed_section(path.with_suffix(".d") / "trials.csv")
        if seed is not None:
            variants[f"sequoia-hw tree of {tag} ({len(seed['tree']['parents'])} nodes)"] = {
                **doc, "techniques": {"speculative": seed}}
    workload = next(d["workload"] for d in variants.values() if d is not None)
    n = int(workload["new_tokens"])
    ids = timing_input_ids(loaded.tokenizer, int(workload["prompt_tokens"]), torch.device("cpu"))
    threads = [int(t) for t in args.threads.split(",")]
    samples: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats + 1):
        for t in threads:
            use_cpu_threads(t)
            for name, doc in variants.items():
                with apply_policy(model, doc) as handle:
                    ttft = time_generate(handle.generate, ids, 1, torch.device("cpu"))
                    full = time_generate(handle.generate, ids, n, torch.device("cpu"))
                if repeat:  # repeat 0 is the warm-up
                    samples.setdefault((t, name), []).append((ttft, full))
        print(f"repeat {repeat}/{args.repeats}", file=sys.stderr, flush=True)

    print(f"\n### Speculative policies across devices (CPU thread counts), {dt.date.today().isoformat()}\n")
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; timing prompt {workload['prompt_tokens']} tokens, "
          f"{n} new tokens, decode tokens/s, median of {args.repeats} interleaved repeats.\n")
    print("| Variant | " + " | ".join(f"cpu:{t}t tok/s" for t in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for name in variants:
        cells = []
        for t in threads:
            s = samples[(t, name)]
            tps = (n - 1) / ((statistics.median(f for _, f in s) - statistics.median(a for a, _ in s)) / 1e3)
            cells.append(f"{tps:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
