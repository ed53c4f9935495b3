"""Activation and weight sparsity on builtin:smollm2-135m: quality on held-out prose, decode speed at batch 1.

    python benchmarks/bench_smollm2_sparsity.py [--levels 0,0.1,0.15,0.25,0.4,0.5] [--repeats 5] [--passkey N]

SmolLM2-135M-Instruct, float32, CPU, `--threads` torch threads. Text is Python's English reference prose
(`tuner.tasks.prose_paragraphs()`): the calibration texts come from its first half, the held-out texts from its
second half (disjoint topics), each a run of consecutive paragraphs cut to a fixed token count.

1. Activation sparsity (`policies.sparsity`): TEAL (and WINA) uniform over every projection group at each level.
   The search space is prepared exactly as `autotune tune` prepares it (`SparsitySpace.prepare`: this device's
   kernel profile and the runtime's calibrated overheads), then its calibration batches are swapped for the
   prose ones, so `SparsitySpace.section` calibrates the thresholds on prose and picks each group's kernel with
   `choose_kernels`, the path every trial of `tune` takes. Quality: teacher-forced top-1 agreement with dense,
   mean KL(dense || sparse) and perplexity on the held-out texts; with `--passkey N`, accuracy on N `passkey`
   examples (`tuner.quality.QualityHarness`, decoding through the full runtime, sparse kernels included).
2. Decode speed: dense and every activation variant timed in one process, repeats interleaved across variants
   (the first round warms up), medians. Decode tokens/s = (new_tokens - 1) / (t(new_tokens) - t(1 token)).
   TEAL sections that run sparse kernels are timed a second time on the masked dense GEMV (`masked` rows), so
   the kernels' gain and the masking's cost can be told apart. The cost model's prediction sits beside each.
   Beside it the memory-bandwidth bound: weight bytes read per decode token (every parameter once; the rows
   a sparse kernel skips are not read) over `--bandwidth-gbs`, and the fraction of that bound reached.
3. Weight sparsity (`policies.weight_sparsity`): magnitude and Wanda (norms calibrated layer by layer on the
   same prose, as `WeightSparsitySpace.section` does) at each weight level, and 2:4 where the hardware takes
   it; the same quality columns. No speed: unstructured zeros leave the dense kernels doing the same work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import transformers  # noqa: E402

from policies.fingerprint import model_fingerprint  # noqa: E402
from policies.schema import PolicyError  # noqa: E402
from policies.sparsity import GROUPS, METHODS, SparsifiedInputs, SparsityRuntime, group_linears  # noqa: E402
from policies.weight_sparsity import TWO_FOUR, WeightSparsityRuntime  # noqa: E402
from profilers.device import resolve_device  # noqa: E402
from search_spaces import SearchContext, get_search_space  # noqa: E402
from search_spaces.sparsity import SparsityCalibration  # noqa: E402
from search_spaces.sparsity_cost import KernelTable, predict_latency_ms  # noqa: E402
from search_spaces.sparsity_profiler import break_even  # noqa: E402
from search_spaces.weight_sparsity import WeightSparsityCalibration  # noqa: E402
from tuner.measure import time_generate  # noqa: E402
from tuner.models import load_model  # noqa: E402
from tuner.quality import QualityConfig, QualityHarness  # noqa: E402
from tuner.tasks import prose_paragraphs  # noqa: E402
from tuner.workload import TunerInputs, timing_input_ids  # noqa: E402

MODEL = "builtin:smollm2-135m"
CPU = torch.device("cpu")
Section = dict[str, Any]


# -- text -----------------------------------------------------------------------------------------------------
def prose_texts(tokenizer: Any, part: str, n: int, n_tokens: int) -> list[torch.Tensor]:
    """`n` token-id tensors (1, `n_tokens`) of English prose from one half of `prose_paragraphs()`: `calibration`
    (first half) or `heldout` (second half). The half is cut into `n` equal slices and each text is the start
    of one slice (consecutive paragraphs joined by blank lines), so no two texts share a paragraph."""
    paragraphs = prose_paragraphs()
    half = len(paragraphs) // 2
    lo, hi = {"calibration": (0, half), "heldout": (half, len(paragraphs))}[part]
    step = (hi - lo) // n
    out = []
    for k in range(n):
        start = lo + k * step
        ids: list[int] = []
        for end in range(start + 1, start + step + 1):
            ids = tokenizer("\n\n".join(paragraphs[start:end])).input_ids
            if len(ids) >= n_tokens:
                break
        if len(ids) < n_tokens:
            raise ValueError(f"{part} prose slice {k} holds only {len(ids)} tokens, fewer than {n_tokens}")
        out.append(torch.tensor([ids[:n_tokens]], dtype=torch.long))
    return out


# -- quality --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextQuality:
    """Teacher-forced quality of a variant on the held-out texts."""

    top1_agreement: float  # percent of positions whose argmax equals dense's
    mean_kl: float  # mean KL(dense || variant) per position, nats
    perplexity: float  # of the variant on the texts' own next tokens


def log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-token log-probabilities (T, vocab) of one (1, T) text."""
    with torch.inference_mode():
        return torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)


def perplexity(lps: list[torch.Tensor], texts: list[torch.Tensor]) -> float:
    """exp(mean negative log-likelihood of each text's tokens 2..T given their prefixes)."""
    nll = sum(-float(lp[:-1].gather(-1, ids[0, 1:, None]).sum()) for lp, ids in zip(lps, texts, strict=True))
    return math.exp(nll / sum(ids.shape[1] - 1 for ids in texts))


def text_quality(model: Any, texts: list[torch.Tensor], reference: list[torch.Tensor]) -> TextQuality:
    """Agreement, KL and perplexity of the model as it is now (hooks applied) against the dense `reference`."""
    agree = total = 0
    kl = 0.0
    lps = []
    for ids, ref in zip(texts, reference, strict=True):
        lp = log_probs(model, ids)
        agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - lp)).sum())
        total += lp.shape[0]
        lps.append(lp)
    return TextQuality(100.0 * agree / total, kl / total, perplexity(lps, texts))


def greedy(model: Any, tokenizer: Any) -> Callable[..., torch.Tensor]:
    """A `generate(ids, max_new_tokens)` callable decoding greedily with the model as it is now."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw)

    return generate


@dataclass
class Evaluator:
    """Dense references (held-out log-probs, passkey answers), built while the model is dense, and the scoring of
    variants against them."""

    model: Any
    tokenizer: Any
    texts: list[torch.Tensor]
    passkey_examples: int

    def __post_init__(self) -> None:
        self.reference = [log_probs(self.model, ids) for ids in self.texts]
        self.dense_perplexity = perplexity(self.reference, self.texts)
        self.harness = None
        if self.passkey_examples:
            config = QualityConfig(tasks=("passkey",), examples_per_task=self.passkey_examples, free_text_samples=0)
            self.harness = QualityHarness(self.model, self.tokenizer, config)

    def passkey(self) -> float | None:
        """Passkey accuracy (percent) of the model as it is now; None without `--passkey`."""
        if self.harness is None:
            return None
        return self.harness.evaluate(greedy(self.model, self.tokenizer)).accuracy

    def dense_passkey(self) -> float | None:
        return None if self.harness is None else self.harness.reference().accuracy


@contextmanager
def applied(runtime: Any, model: Any, section: Section | None) -> Iterator[Any]:
    """The model with `runtime` applied with `section` (as it is when `section` is None); removed on exit."""
    handle = runtime.apply(model, section) if section is not None else None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()


# -- activation sparsity: sections through the search space -------------------------------------------------------
def prepared_space(loaded: Any, batches: list[torch.Tensor], prompt_tokens: int,
                   new_tokens: int) -> tuple[Any, SearchContext]:
    """The sparsity search space prepared as `autotune tune` prepares it (kernel profile, overheads), with its
    calibration batches then replaced by `batches` (prose), so sections are calibrated on prose."""
    space = get_search_space("sparsity")
    ctx = SearchContext(model_fingerprint=model_fingerprint(loaded.model), device={},
                        workload={"prompt_tokens": prompt_tokens, "new_tokens": new_tokens},
                        objective="latency_ms", inputs=TunerInputs())
    calibration = space.prepare(ctx, loaded.model, loaded.tokenizer, CPU)
    calibration.batches = batches
    ctx.prepared[space.name] = calibration
    return space, ctx


def activation_sections(space: Any, ctx: SearchContext, methods: list[str], levels: list[float]) -> dict[str, Section]:
    """name -> calibrated section (kernels chosen from this device's profile), uniform over all groups."""
    n = ctx.num_layers
    return {f"{method}-{pct(level)}": space.section(ctx, method, [[level] * len(GROUPS)] * n)
            for method in methods for level in levels if level > 0}


def pct(level: float) -> str:
    """0.15 -> '15'."""
    return f"{level * 100:g}"


def kernels_summary(section: Section | None) -> str:
    """Which kernels a section's groups run at batch 1, e.g. 'csr_mv (60 groups)'."""
    kernels = (section or {}).get("kernels")
    if not kernels:
        return "dense"
    n = sum(k != "dense" for row in kernels for k in row)
    return f"{'+'.join(sorted({k for row in kernels for k in row if k != 'dense'}))} ({n} groups)"


@contextmanager
def masked(model: Any, section: Section) -> Iterator[SparsifiedInputs]:
    """The section's masking hooks alone, counting what they zero: on inputs of more than one row (teacher-forced
    text) this is exactly what the runtime computes, since its sparse kernels take single rows only."""
    thresholds = [dict(zip(GROUPS, row, strict=True)) for row in section["thresholds"]]
    hooks = SparsifiedInputs(model, thresholds, method=section["method"], track=True)
    try:
        yield hooks
    finally:
        hooks.remove()


def mean_observed(hooks: SparsifiedInputs) -> float:
    """Mean fraction (percent) of input channels zeroed over all sparsified groups since the hooks went on."""
    values = hooks.observed_sparsity().values()
    return 100.0 * sum(values) / max(len(values), 1)


# -- decode speed ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """Medians of one variant's generate calls."""

    ttft_ms: float  # a 1-token call
    latency_ms: float  # a new_tokens call
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / ((self.latency_ms - self.ttft_ms) / 1e3)


def time_variants(model: Any, tokenizer: Any, sections: dict[str, Section | None], input_ids: torch.Tensor,
                  new_tokens: int, repeats: int) -> dict[str, Speed]:
    """Per variant the median 1-token and `new_tokens` generate times, repeats interleaved across variants so
    that drift hits all alike; round 0 is a warm-up."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sections}
    for r in range(repeats + 1):
        for name, section in sections.items():
            with applied(SparsityRuntime(), model, section):
                generate = greedy(model, tokenizer)
                first = time_generate(generate, input_ids, 1, CPU)
                full = time_generate(generate, input_ids, new_tokens, CPU)
            if r:
                samples[name].append((first, full))
    return {name: Speed(statistics.median(a for a, _ in v), statistics.median(b for _, b in v), new_tokens)
            for name, v in samples.items()}


def masked_variants(sections: dict[str, Section]) -> dict[str, Section]:
    """The TEAL sections that run sparse kernels, again without them (every group on the masked dense GEMV),
    to separate what the kernels gain from what masking costs."""
    out = {}
    for name, section in sections.items():
        if section["method"] == "teal" and section.get("kernels"):
            out[f"{name} masked"] = {k: v for k, v in section.items() if k != "kernels"}
    return out


def decode_weight_bytes(model: Any, section: Section | None) -> float:
    """Bytes of weights one decode token reads: every parameter once (the tied embedding is the LM head's
    matrix), less the rows of W^T a sparse kernel skips, taken at the group's target level."""
    total = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    kernels = (section or {}).get("kernels")
    if not kernels:
        return total
    for groups, levels, names in zip(group_linears(model), section["levels"], kernels, strict=True):
        for group, level, kernel in zip(GROUPS, levels, names, strict=True):
            if kernel != "dense":
                total -= level * sum(lin.weight.numel() * lin.weight.element_size() for lin in groups[group])
    return total


def predicted_tokens_per_s(ctx: SearchContext, section: Section | None, dense: Speed) -> float | None:
    """The cost model's decode tokens/s for `section` (the one `tune` prunes trials with), from dense's times."""
    if section is None:
        return None
    cal = ctx.prepared_state("sparsity", SparsityCalibration)
    table, baseline = KernelTable(cal.kernels), {"ttft_ms": dense.ttft_ms, "latency_ms": dense.latency_ms}
    ttft, latency = (predict_latency_ms(section, table, cal.overheads, baseline, dense.new_tokens, objective)
                     for objective in ("ttft_ms", "latency_ms"))
    return (dense.new_tokens - 1) / ((latency - ttft) / 1e3)


# -- weight sparsity ------------------------------------------------------------------------------------------
def weight_sections(loaded: Any, batches: list[torch.Tensor], levels: list[float]) -> dict[str, Section]:
    """name -> section through `WeightSparsitySpace.section` (Wanda's norms calibrated on `batches`, layer by
    layer at the section's levels), plus 2:4 magnitude / Wanda when this hardware takes 2:4."""
    space = get_search_space("weight_sparsity")
    ctx = SearchContext(model_fingerprint=model_fingerprint(loaded.model), device={}, workload={})
    ctx.prepared[space.name] = WeightSparsityCalibration(model=loaded.model, batches=batches, outliers=[])
    n = ctx.num_layers
    return {f"{method}-{pct(level)}": space.section(ctx, method, [level] * n)
            for method in ("magnitude", "wanda") for level in levels}


def two_four_problem(model: Any) -> str | None:
    """Why the runtime refuses 2:4 on this model and device (None when it takes it)."""
    try:
        with applied(WeightSparsityRuntime(), model, {"method": "magnitude", "structure": TWO_FOUR}):
            return None
    except PolicyError as exc:
        return str(exc)


# -- output ---------------------------------------------------------------------------------------------------
def header(args: argparse.Namespace) -> None:
    """The bench's provenance: date, device, versions, the exact command, the text split."""
    try:
        fp = resolve_device(f"cpu:{args.threads}t")
        device = f"{fp.id} ({fp.fields.get('model') or fp.name}, {args.threads} threads)"
    except Exception:  # the benchmark must run even where the profiler cannot fingerprint
        device = f"cpu ({args.threads} threads)"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# bench_smollm2_sparsity {now} `python benchmarks/bench_smollm2_sparsity.py {shlex.join(sys.argv[1:])}`")
    print(f"# device {device}, torch {torch.__version__}, transformers {transformers.__version__}, {MODEL} "
          f"float32, load average {os.getloadavg()[0]:.2f} at start")
    print(f"# calibration: {args.calib_texts} prose texts x {args.calib_tokens} tokens (first half of "
          f"prose_paragraphs()); held-out: {args.heldout_texts} x {args.heldout_tokens} tokens (second half); "
          f"timing: prompt {args.prompt_tokens}, {args.new_tokens} new tokens, median of {args.repeats} "
          f"interleaved repeats; bandwidth bound at {args.bandwidth_gbs:g} GB/s", flush=True)


def print_kernel_profile(ctx: SearchContext) -> None:
    """Per group shape, each profiled sparsity's fastest sparse kernel as a multiple of the dense GEMV time,
    the break-even sparsity, and the calibrated overheads."""
    cal = ctx.prepared_state("sparsity", SparsityCalibration)
    rows = [r for r in cal.kernels if int(r["layer"]) == 0]
    sparsities = sorted({float(r["sparsity"]) for r in rows if float(r["sparsity"]) > 0})
    o = cal.overheads
    print(f"\n## Kernel profile of this device (layer 0's shapes; every layer has them)\n\nOverheads per sparsified "
          f"group: masking {o.mask_us:.1f} us/token, sparse path {o.sparse_us:.1f} us/token, prefill "
          f"{o.prefill_ms:.3f} ms. Cells: fastest sparse kernel, its time / dense GEMV time.\n")
    print("| group | out x in | dense us | " + " | ".join(f"s={s:g}" for s in sparsities) + " | break-even |")
    print("|---|---|---:|" + "---|" * len(sparsities) + "---|")
    for group in GROUPS:
        mine = [r for r in rows if r["group"] == group]
        dense = next(r["us"] for r in mine if r["kernel"] == "dense")
        cells = []
        for s in sparsities:
            best = min((r for r in mine if float(r["sparsity"]) == s and r["kernel"] != "dense"), key=lambda r: r["us"])
            cells.append(f"{best['kernel']} {best['us'] / dense:.2f}x")
        even = break_even(mine, group)
        print(f"| {group} | {mine[0]['out_features']}x{mine[0]['in_features']} | {dense:.1f} | " + " | ".join(cells)
              + f" | {'never' if even is None else f'{even:g}'} |")


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_quality_table(title: str, rows: dict[str, dict[str, Any]], passkey: bool) -> None:
    """One row per variant: target and observed sparsity (activation only), agreement, KL, perplexity, passkey."""
    print(f"\n## {title}\n")
    print("| variant | target sparsity % | observed sparsity % | top-1 agreement % | mean KL | perplexity |"
          + (" passkey % |" if passkey else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if passkey else ""))
    for name, r in rows.items():
        q: TextQuality = r["quality"]
        print(f"| {name} | {fmt(r.get('target'), 'g')} | {fmt(r.get('observed'), '.1f')} | {q.top1_agreement:.2f} | "
              f"{q.mean_kl:.4f} | "
              f"{q.perplexity:.2f} |" + (f" {fmt(r.get('passkey'), '.0f')} |" if passkey else ""), flush=True)


def print_speed_table(model: Any, ctx: SearchContext, sections: dict[str, Section | None],
                      speeds: dict[str, Speed], bandwidth_gbs: float) -> None:
    """One row per variant: kernels, TTFT, decode tok/s, vs dense, the cost model's prediction, the bound."""
    dense = speeds["dense"]
    print("\n## Decode speed (batch 1)\n")
    print("| variant | kernels | TTFT ms | decode tok/s | vs dense | predicted tok/s | weight MB/token | "
          "bound tok/s | % of bound |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, section in sections.items():
        s = speeds[name]
        mb = decode_weight_bytes(model, section) / 1e6
        bound = bandwidth_gbs * 1e3 / mb
        print(f"| {name} | {kernels_summary(section)} | {s.ttft_ms:.1f} | {s.tokens_per_s:.2f} | "
              f"{s.tokens_per_s / dense.tokens_per_s:.2f}x | {fmt(predicted_tokens_per_s(ctx, section, dense), '.2f')} "
              f"| {mb:.0f} | {bound:.1f} | {100 * s.tokens_per_s / bound:.0f} |", flush=True)


# -- main -----------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="0,0.1,0.15,0.25,0.4,0.5", help="activation sparsity levels (0: dense)")
    ap.add_argument("--methods", default=",".join(METHODS), help="activation methods the runtime has")
    ap.add_argument("--weight-levels", default="0.1,0.2,0.3,0.5", help="weight sparsity levels ('' to skip)")
    ap.add_argument("--calib-texts", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--heldout-texts", type=int, default=6)
    ap.add_argument("--heldout-tokens", type=int, default=384)
    ap.add_argument("--passkey", type=int, default=0, help="passkey examples per variant (0: none)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true", help="skip the decode timing")
    ap.add_argument("--no-masked", action="store_true", help="do not also time TEAL sections on the masked dense "
                    "GEMV (their kernels taken out)")
    ap.add_argument("--bandwidth-gbs", type=float, default=20.0, help="memory bandwidth of the bound, GB/s")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    header(args)
    levels = [float(v) for v in args.levels.split(",")]
    methods = [m for m in args.methods.split(",") if m in METHODS]
    weight_levels = [float(v) for v in args.weight_levels.split(",") if v]
    loaded = load_model(MODEL, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    calib = prose_texts(tokenizer, "calibration", args.calib_texts, args.calib_tokens)
    heldout = prose_texts(tokenizer, "heldout", args.heldout_texts, args.heldout_tokens)
    evaluator = Evaluator(model, tokenizer, heldout, args.passkey)
    dense_row = {"quality": TextQuality(100.0, 0.0, evaluator.dense_perplexity), "passkey": evaluator.dense_passkey()}

    space, ctx = prepared_space(loaded, calib, args.prompt_tokens, args.new_tokens)
    print_kernel_profile(ctx)
    sections = activation_sections(space, ctx, methods, levels)
    rows: dict[str, dict[str, Any]] = {"dense": dense_row}
    for name, section in sections.items():
        with masked(model, section) as hooks:
            quality = text_quality(model, heldout, evaluator.reference)
            rows[name] = {"quality": quality, "observed": mean_observed(hooks), "target": 100 * section["levels"][0][0]}
        if args.passkey:
            with applied(SparsityRuntime(), model, section):  # decoding takes the sparse kernels
                rows[name]["passkey"] = evaluator.passkey()
    print_quality_table(f"Activation sparsity (uniform over all groups; {', '.join(methods)}): quality on "
                        "held-out prose", rows, bool(args.passkey))
    print(f"\n(activation quality done at {time.perf_counter() - started:.0f} s)", flush=True)

    if not args.no_speed:
        timed: dict[str, Section | None] = {"dense": None, **sections}
        if not args.no_masked:
            timed.update(masked_variants(sections))
        input_ids = timing_input_ids(tokenizer, args.prompt_tokens, CPU)
        speeds = time_variants(model, tokenizer, timed, input_ids, args.new_tokens, args.repeats)
        print_speed_table(model, ctx, timed, speeds, args.bandwidth_gbs)
        print(f"\n(decode timing done at {time.perf_counter() - started:.0f} s)", flush=True)

    if weight_levels:
        wrows: dict[str, dict[str, Any]] = {"dense": dense_row}
        for name, section in weight_sections(loaded, calib, weight_levels).items():
            with applied(WeightSparsityRuntime(), model, section):
                wrows[name] = {"quality": text_quality(model, heldout, evaluator.reference),
                               "passkey": evaluator.passkey(), "target": 100 * section["levels"][0][0]}
        print_quality_table("Weight sparsity (unstructured, uniform over all groups): quality on held-out prose",
                            wrows, bool(args.passkey))
        problem = two_four_problem(model)
        print(f"\n2:4: {'refused by the runtime: ' + problem if problem else 'supported here (not measured)'}")
    print(f"\n(total {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
