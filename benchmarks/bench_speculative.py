"""Speculative decoding at batch 1: decode tokens/s of the tuned policy against dense and the peers, by task.

The claim under test (issue "Speculative decoding with hardware-aware tree shapes"): on `builtin:tiny`, the
tuned policy decodes >= 2.0x the tokens/s of dense and >= 1.3x of Hugging Face assisted generation with the
same draft model (`builtin:tiny-draft`), on the built-in tasks and on free text.

Variants, timed in one process with interleaved repeats (medians): dense (`model.generate`), HF assisted
generation with the draft (its defaults: 20 assistant tokens, heuristic schedule), HF prompt-lookup decoding,
a chain of k=5 with the draft (gpt-fast's default), an EAGLE-2/SGLang-like dynamic tree (depth 5, top-k 4,
8 tokens), and each policy file given with `--policy` (tune one with `autotune tune --techniques speculative
--objective tokens_per_s`). Every variant's output is checked against dense greedy output, token for token.

Decode tokens/s = (new_tokens - 1) / (time of a `new_tokens` call - time of a 1-token call). Mean accepted
draft tokens per verify step, and its spread (stdev over steps), are reported per task.

    python benchmarks/bench_speculative.py --policy policies/builtin-tiny/<device>.yaml [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from policies import apply_policy, load_policy_file, policy_to_dict  # noqa: E402
from policies.drafters import PromptLookupDrafter  # noqa: E402
from policies.speculative import speculative_generate  # noqa: E402
from profilers.device import resolve_device, torch_device  # noqa: E402
from search_spaces import SearchContext, get_search_space  # noqa: E402
from search_spaces.speculative_peers import hf_speculative_peers  # noqa: E402
from tuner.measure import time_generate  # noqa: E402
from tuner.models import load_model  # noqa: E402
from tuner.tasks import code_samples, get_task  # noqa: E402
from tuner.workload import timing_input_ids  # noqa: E402


def task_prompts(tokenizer, device: torch.device, prompt_tokens: int) -> dict[str, torch.Tensor]:
    """One prompt per built-in task, free text (held-out stdlib code) and the synthetic timing prompt."""
    prompts = {task: get_task(task).examples(1, seed=4242)[0].prompt for task in ("needle", "pattern")}
    prompts["free-text"] = code_samples(1, seed=4242, n_chars=2000)[0]
    out = {name: tokenizer(text, return_tensors="pt").input_ids.to(device) for name, text in prompts.items()}
    out["timing"] = timing_input_ids(tokenizer, prompt_tokens, device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--draft-model", default="builtin:tiny-draft")
    ap.add_argument("--policy", action="append", default=[], help="policy YAML (repeatable)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()

    device_fp = resolve_device(args.device)
    device = torch_device(device_fp)
    loaded = load_model(args.model, device)
    model, tok = loaded.model, loaded.tokenizer
    prompts = task_prompts(tok, device, args.prompt_tokens)
    n = args.new_tokens

    def dense(ids, **kw):
        return model.generate(ids, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)

    variants: dict[str, tuple[Callable[..., torch.Tensor], dict | None]] = {"dense": (dense, None)}
    never = PromptLookupDrafter(min_ngram=10**9, max_ngram=10**9)  # proposes nothing: the bare loop

    def no_draft(ids, max_new_tokens, min_new_tokens=0, **kw):
        return speculative_generate(model, ids, max_new_tokens, never, min_new_tokens=min_new_tokens)

    # Our decode loop with no drafts: how much of a speed-up is the leaner loop rather than speculation.
    variants["autotune loop, no drafts"] = (no_draft, None)
    for peer in hf_speculative_peers(model, {"draft_model": args.draft_model}):
        variants[f"peer:{peer.name}"] = (peer.generate, None)
    space = get_search_space("speculative")
    ctx = SearchContext(model_fingerprint={}, workload={}, device=device_fp.to_dict(),
                        draft_model=args.draft_model)
    base = None
    for path in args.policy:
        policy = load_policy_file(path)
        base = policy_to_dict(policy)
        variants[f"policy:{Path(path).stem}"] = (None, base)  # type: ignore[assignment]
    for preset in space.presets(ctx):
        doc = dict(base) if base else None
        if doc is None:
            continue
        doc["techniques"] = {"speculative": preset.section}
        variants[f"preset:{preset.name}"] = (None, doc)  # type: ignore[assignment]

    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    accepted: dict[tuple[str, str], list[int]] = {}
    with torch.inference_mode():
        references = {task: dense(ids, max_new_tokens=n, min_new_tokens=n) for task, ids in prompts.items()}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up and checks outputs
        for name, (generate, doc) in variants.items():
            handle = apply_policy(model, doc) if doc is not None else None
            gen = handle.generate if handle is not None else generate
            try:
                for task, ids in prompts.items():
                    if repeat == 0:
                        with torch.inference_mode():
                            out = gen(ids, max_new_tokens=n, min_new_tokens=n)
                        if not torch.equal(out, references[task]):
                            raise SystemExit(f"{name} on {task}: output differs from dense greedy")
                        owner = getattr(handle, "decode_owner", None) if handle is not None else None
                        stats = getattr(owner, "last_stats", None)
                        if stats is not None:
                            accepted[(name, task)] = list(stats.accepted_per_step)
                        continue
                    ttft = time_generate(gen, ids, 1, device)
                    full = time_generate(gen, ids, n, device)
                    times.setdefault((name, task), []).append((ttft, full))
            finally:
                if handle is not None:
                    handle.remove()
        print(f"repeat {repeat}/{args.repeats} done", file=sys.stderr, flush=True)

    rows = []
    for name in variants:
        for task in prompts:
            samples = times[(name, task)]
            ttft = statistics.median(t for t, _ in samples)
            full = statistics.median(f for _, f in samples)
            steps = accepted.get((name, task))
            rows.append({"variant": name, "task": task, "tokens_per_s": (n - 1) / ((full - ttft) / 1e3),
                         "latency_ms": full, "ttft_ms": ttft,
                         "mean_accepted": statistics.mean(steps) if steps else None,
                         "stdev_accepted": statistics.pstdev(steps) if steps else None})
    dense_tps = {r["task"]: r["tokens_per_s"] for r in rows if r["variant"] == "dense"}
    assisted_tps = {r["task"]: r["tokens_per_s"] for r in rows if r["variant"] == "peer:hf-assisted"}
    for r in rows:
        r["vs_dense"] = r["tokens_per_s"] / dense_tps[r["task"]]
        r["vs_hf_assisted"] = r["tokens_per_s"] / assisted_tps[r["task"]] if assisted_tps else None

    print(f"\n### Speculative decoding on {device_fp.name} ({device_fp.id}), {dt.date.today().isoformat()}\n")
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; {n} new tokens, batch 1, median of {args.repeats} "
          "interleaved repeats; every variant's output equals dense greedy output.\n")
    print("| Task | Variant | Decode tok/s | vs dense | vs HF assisted | Accepted/step (mean ± sd) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f} ± {r['stdev_accepted']:.2f}"
        vs_hf = "" if r["vs_hf_assisted"] is None else f"{r['vs_hf_assisted']:.2f}x"
        print(f"| {r['task']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_dense']:.2f}x | {vs_hf} | {acc} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_fp.to_dict(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
