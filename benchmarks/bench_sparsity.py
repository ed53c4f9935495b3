"""Activation sparsity at batch 1: decode tokens/s and quality of sparsity policies against dense, per model.

The claim under test (issue "Sparsity levels per layer, with kernels that really skip work"): within the quality
budget (<= 1 point task accuracy, top-1 agreement with dense on free text >= 95%), the tuned assignment decodes
>= 1.3x dense and >= 1.1x the TEAL-uniform preset on this CPU; if `builtin:tiny`'s matrices are too small for
any kernel to win, show it and show the largest built-in model.

For each model the sparsity search space is prepared exactly as `autotune tune` prepares it (kernel profile of
this device, calibrated overheads), then a grid of sections is built through it: TEAL-uniform and TEAL-greedy
(and WINA-uniform) at several levels, each with the kernels this device's profile picks (`choose_kernels`).
Every variant is timed in one process with interleaved repeats (medians) beside dense; the cost model's
prediction is printed next to each measurement. Quality (`tuner.quality`: task accuracy on needle + pattern,
top-1 agreement and KL on held-out code) is measured on `--quality-model` (default `builtin:tiny`) with the
same levels: `builtin:tiny-wide` computes the same function as `builtin:tiny` (Net2Net widening), so its
quality is tiny's by construction; `--check-wide-quality` measures its top-1 agreement too, to confirm.

    python benchmarks/bench_sparsity.py --model builtin:tiny --model builtin:tiny-wide [--levels 0.3,0.5,0.7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from policies.fingerprint import model_fingerprint  # noqa: E402
from policies.sparsity import GROUPS, SparsityRuntime  # noqa: E402
from search_spaces import SearchContext, get_search_space  # noqa: E402
from search_spaces.sparsity import SparsityCalibration  # noqa: E402
from search_spaces.sparsity_greedy import levels_for  # noqa: E402
from tuner.measure import time_generate  # noqa: E402
from tuner.models import load_model  # noqa: E402
from tuner.quality import QualityConfig, QualityHarness  # noqa: E402
from tuner.workload import TunerInputs, timing_input_ids  # noqa: E402


def prepared_context(loaded: Any, prompt_tokens: int, new_tokens: int) -> tuple[Any, SearchContext]:
    space = get_search_space("sparsity")
    ctx = SearchContext(model_fingerprint=model_fingerprint(loaded.model), device={},
                        workload={"prompt_tokens": prompt_tokens, "new_tokens": new_tokens},
                        objective="latency_ms", inputs=TunerInputs())
    ctx.prepared[space.name] = space.prepare(ctx, loaded.model, loaded.tokenizer, torch.device("cpu"))
    return space, ctx


def grid(space: Any, ctx: SearchContext, levels: list[float]) -> dict[str, dict[str, Any]]:
    """name -> section: TEAL uniform and greedy, WINA uniform, at each level."""
    n = ctx.num_layers
    sections = {}
    for level in levels:
        pct = round(level * 100)
        sections[f"teal-uniform-{pct}"] = space.section(ctx, "teal", [[level] * len(GROUPS)] * n)
        sections[f"wina-uniform-{pct}"] = space.section(ctx, "wina", [[level] * len(GROUPS)] * n)
        sections[f"teal-greedy-{pct}"] = space.section(ctx, "teal", levels_for(space.greedy_paths(ctx, "teal"),
                                                                               level))
    return sections


def decode_ms(model: Any, input_ids: torch.Tensor, new_tokens: int) -> float:
    """One measurement of the decode time per token: (n-token call - 1-token call) / (n - 1)."""
    gen = model.generate
    first = time_generate(lambda ids, **kw: gen(ids, do_sample=False, **kw), input_ids, 1, torch.device("cpu"))
    full = time_generate(lambda ids, **kw: gen(ids, do_sample=False, **kw), input_ids, new_tokens,
                         torch.device("cpu"))
    return (full - first) / (new_tokens - 1)


def time_variants(model: Any, sections: dict[str, dict | None], input_ids: torch.Tensor, new_tokens: int,
                  repeats: int) -> dict[str, float]:
    """Median decode ms/token per variant, repeats interleaved across variants (drift hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in sections}
    for r in range(repeats + 1):  # the first round warms up
        for name, section in sections.items():
            handle = SparsityRuntime().apply(model, section) if section is not None else None
            try:
                ms = decode_ms(model, input_ids, new_tokens)
            finally:
                if handle is not None:
                    handle.remove()
            if r:
                samples[name].append(ms)
    return {name: statistics.median(v) for name, v in samples.items()}


def quality_of(loaded: Any, sections: dict[str, dict | None], cfg: QualityConfig) -> dict[str, Any]:
    harness = QualityHarness(loaded.model, loaded.tokenizer, cfg)
    model = loaded.model
    out = {"dense": harness.reference()}
    for name, section in sections.items():
        if section is None:
            continue
        handle = SparsityRuntime().apply(model, section)
        try:
            out[name] = harness.evaluate(lambda ids, max_new_tokens: model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False), model)
        finally:
            handle.remove()
    return out


def kernels_summary(section: dict | None) -> str:
    if not section or not section.get("kernels"):
        return "dense"
    used = sorted({k for row in section["kernels"] for k in row if k != "dense"})
    n = sum(k != "dense" for row in section["kernels"] for k in row)
    return f"{'+'.join(used)} ({n} groups)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--quality-model", default="builtin:tiny")
    ap.add_argument("--levels", default="0.2,0.3,0.5,0.7,0.8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-wide-quality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [float(v) for v in args.levels.split(",")]
    models = args.model or ["builtin:tiny", "builtin:tiny-wide"]
    print(f"# bench_sparsity {dt.date.today()} `python benchmarks/bench_sparsity.py {shlex.join(sys.argv[1:])}`")
    print(f"# torch {torch.__version__}, {args.threads} threads, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, median of {args.repeats} interleaved repeats")

    quality_cfg = QualityConfig()
    qloaded = load_model(args.quality_model)
    qspace, qctx = prepared_context(qloaded, args.prompt_tokens, args.new_tokens)
    quality = quality_of(qloaded, grid(qspace, qctx, levels), quality_cfg)
    del qloaded, qspace, qctx

    for spec in models:
        loaded = load_model(spec)
        space, ctx = prepared_context(loaded, args.prompt_tokens, args.new_tokens)
        o = ctx.prepared_state("sparsity", SparsityCalibration).overheads
        print(f"\n## {spec}: overheads per sparsified group: masking {o.mask_us:.1f} us/token, sparse path "
              f"{o.sparse_us:.1f} us/token, prefill {o.prefill_ms:.3f} ms")
        sections: dict[str, dict | None] = {"dense": None, **grid(space, ctx, levels)}
        input_ids = timing_input_ids(loaded.tokenizer, args.prompt_tokens, torch.device("cpu"))
        ms = time_variants(loaded.model, sections, input_ids, args.new_tokens, args.repeats)
        dense_ms = ms["dense"]
        baseline = {"ttft_ms": 0.0, "latency_ms": dense_ms * (args.new_tokens - 1)}
        ctx.baseline = baseline
        wide_agreement = {}
        if args.check_wide_quality and spec != args.quality_model:
            cfg = QualityConfig(tasks=(), free_text_samples=2)
            wide_agreement = {k: v.top1_agreement for k, v in quality_of(loaded, sections, cfg).items()}
        print("| variant | kernels | decode ms/token | predicted | tok/s | vs dense | accuracy | top-1 agr. | KL |"
              + (" wide top-1 |" if wide_agreement else ""))
        print("|---|---|---|---|---|---|---|---|---|" + ("---|" if wide_agreement else ""))
        for name, section in sections.items():
            pred = "" if section is None else (
                f"{space.predict_ms(section, ctx) / (args.new_tokens - 1):.2f}")
            q = quality.get(name)
            qcols = f"{q.accuracy:.1f} | {q.top1_agreement:.1f} | {q.mean_kl:.4f}" if q else "| |"
            wide = f" {wide_agreement[name]:.1f} |" if name in wide_agreement else ""
            print(f"| {name} | {kernels_summary(section)} | {ms[name]:.2f} | {pred} | {1e3 / ms[name]:.1f} | "
                  f"{dense_ms / ms[name]:.2f}x | {qcols} |{wide}", flush=True)
        del loaded, space, ctx


if __name__ == "__main__":
    main()
