"""Activation sparsity levels per layer (TEAL / WINA), chosen by the tuner (groundwork for issue 5).

Parameters an Optuna trial samples (`sparsity.*`):
- `method`: `teal` (|x|) or `wina` (|x| times the weight column norm);
- `allocation`: `uniform` (one `level` everywhere), `owl` (OWL, Yin et al. 2024: layers with a larger share of
  outlier activations — above `M` times the layer's mean magnitude — get proportionally lower sparsity,
  within +/- `lambda` of the mean level), or `free` (one level per layer, `l0..l{L-1}`).
The section's thresholds are calibrated for the sampled levels on calibration text (`prepare` keeps the
batches), sequentially as `policies.activation_sparsity.calibrate_thresholds` does, so a policy file needs no
calibration at inference time.

Presets: TEAL uniform 40% and 50% (the paper's headline levels).

Kernels: `prepare` profiles the sparse-row kernels against the dense GEMV for this model's group shapes on
this device (`profilers.sparse_profiler`); a section gets a `kernels` row per layer naming, for each group, the
kernel measured fastest at its level (`choose_kernels`), and none when dense wins everywhere (the usual case
for `builtin:tiny` on a CPU, see `benchmarks/RESULTS.md`).

Not yet here (issue 5): TEAL's greedy per-projection allocation, a cost hook (it needs the masking cost as
well as the kernel profile), and weight sparsity.
"""

from __future__ import annotations

from typing import Any

import optuna
import torch

from policies.activation_sparsity import GROUPS, calibrate_thresholds, group_linears
from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace

ALLOCATIONS = ("uniform", "owl", "free")
OWL_M = 5.0  # outlier: |x| above M times the layer's mean magnitude (OWL's setting)


def owl_levels(outlier_ratios: list[float], level: float, lam: float) -> list[float]:
    """Per-layer levels with mean `level`: more outliers -> less sparsity, spread within +/- `lam`."""
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    if hi - lo < 1e-12:
        return [level] * len(outlier_ratios)
    # Map the outlier ratio to [-lam, +lam] (most outliers -> -lam), then recentre on `level`.
    offsets = [lam - 2 * lam * (r - lo) / (hi - lo) for r in outlier_ratios]
    mean = sum(offsets) / len(offsets)
    return [min(0.95, max(0.0, level + o - mean)) for o in offsets]


class SparsitySpace(SearchSpace):
    name = "sparsity"
    quality_metric = "accuracy"

    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> None:
        """Calibration batches (held-out stdlib code) and each layer's outlier ratio (for OWL)."""
        from tuner.tasks import code_samples

        batches = [tokenizer(t, return_tensors="pt").input_ids.to(device)
                   for t in code_samples(3, seed=2024, n_chars=1500)]
        ctx.extras["sparsity.model"] = model
        ctx.extras["sparsity.batches"] = batches
        ctx.extras["sparsity.outliers"] = outlier_ratios(model, batches)
        _save_kernel_profile(ctx, model)

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        n = ctx.num_layers
        method = trial.suggest_categorical("sparsity.method", ["teal", "wina"])
        allocation = trial.suggest_categorical("sparsity.allocation", ALLOCATIONS)
        if allocation == "free":
            levels = [trial.suggest_float(f"sparsity.l{i}", 0.0, 0.8) for i in range(n)]
        else:
            level = trial.suggest_float("sparsity.level", 0.1, 0.7)
            if allocation == "owl":
                lam = trial.suggest_float("sparsity.lambda", 0.02, 0.15)
                levels = owl_levels(ctx.extras.get("sparsity.outliers") or [0.0] * n, level, lam)
            else:
                levels = [level] * n
        return self.section(ctx, method, levels)

    def section(self, ctx: SearchContext, method: str, levels: list[float]) -> dict[str, Any]:
        """The policy section for per-layer `levels` (every group of a layer at its level), calibrated."""
        rows = [[round(float(v), 4)] * len(GROUPS) for v in levels]
        section: dict[str, Any] = {"method": method, "levels": rows}
        model, batches = ctx.extras.get("sparsity.model"), ctx.extras.get("sparsity.batches")
        if model is None or not batches:
            raise RuntimeError("sparsity: prepare() must run before sections can be calibrated")
        thresholds = calibrate_thresholds(model, batches, [dict(zip(GROUPS, row, strict=True)) for row in rows],
                                          method=method)
        section["thresholds"] = [[round(t.get(g, 0.0), 6) for g in GROUPS] for t in thresholds]
        profile = ctx.extras.get("sparsity.kernels")
        if profile:
            kernels = choose_kernels(profile, rows)
            if any(k != "dense" for row in kernels for k in row):
                section["kernels"] = kernels
        return section

    def presets(self, ctx: SearchContext) -> list[Preset]:
        presets = []
        for level in (0.4, 0.5):
            params = {"sparsity.method": "teal", "sparsity.allocation": "uniform", "sparsity.level": level}
            try:
                section = self.section(ctx, "teal", [level] * ctx.num_layers)
            except RuntimeError:
                continue  # not prepared (e.g. `bench` without a study): the presets need calibration
            presets.append(Preset(f"teal-{round(level * 100)}", params, section,
                                  f"TEAL uniform {round(level * 100)}% on every projection's input"))
        return presets


def choose_kernels(profile: list[dict[str, Any]], levels: list[list[float]]) -> list[list[str]]:
    """Per layer and group, the fastest kernel measured on this device at the highest profiled sparsity not
    above the group's level (a conservative reading: the real level is at least that sparse); `dense` unless
    a sparse kernel beat the dense GEMV there."""
    table: dict[tuple[int, str], dict[float, dict[str, float]]] = {}
    for r in profile:
        table.setdefault((int(r["layer"]), r["group"]), {}).setdefault(float(r["sparsity"]), {})[r["kernel"]] = r["us"]
    out = []
    for layer, row in enumerate(levels):
        choices = []
        for group, level in zip(GROUPS, row, strict=True):
            points = table.get((layer, group), {})
            below = [s for s in points if s <= level]
            if level <= 0 or not below:
                choices.append("dense")
                continue
            times = points[max(below)]
            choices.append(min(times, key=times.get))
        out.append(choices)
    return out


def _save_kernel_profile(ctx: SearchContext, model: Any) -> None:
    """Profile the sparse kernels against dense for this model's group shapes on this device; keep the rows
    in the context and write `sparsity-kernels.csv` beside the study (the report plots the break-even)."""
    import pandas as pd

    from profilers.sparse_profiler import profile_sparse_kernels

    rows = profile_sparse_kernels(model)
    ctx.extras["sparsity.kernels"] = rows
    artefacts = ctx.extras.get("artefacts")
    if artefacts is not None:
        tmp = artefacts / "sparsity-kernels.csv.tmp"
        pd.DataFrame(rows).to_csv(tmp, index=False)
        tmp.replace(artefacts / "sparsity-kernels.csv")


def outlier_ratios(model: Any, batches: list[torch.Tensor], m: float = OWL_M) -> list[float]:
    """Per layer, the share of input activations (all four groups) above `m` times the layer's mean |x|."""
    layers = group_linears(model)
    counts = [[0, 0] for _ in layers]
    hooks = []

    def record(i: int):
        def hook(module: Any, args: tuple) -> None:
            x = args[0].detach().abs().float()
            counts[i][0] += int((x > m * x.mean()).sum())
            counts[i][1] += x.numel()
        return hook

    try:
        for i, groups in enumerate(layers):
            for lins in groups.values():
                hooks.append(lins[0].register_forward_pre_hook(record(i)))
        with torch.inference_mode():
            for ids in batches:
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    return [a / max(b, 1) for a, b in counts]


register_search_space(SparsitySpace())
