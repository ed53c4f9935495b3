"""Activation sparsity levels per layer and projection (TEAL / WINA), chosen by the tuner.

Parameters an Optuna trial samples (`sparsity.*`):
- `method`: `teal` (|x|) or `wina` (|x| times the weight column norm);
- `allocation`: `uniform` (one `level` everywhere), `owl` (OWL, Yin et al. 2024: layers with a larger share of
  outlier activations — above `M` times the layer's mean magnitude — get proportionally lower sparsity,
  within +/- `lambda` of the mean level), `greedy` (TEAL's per-projection allocation at block sparsity
  `level`, `search_spaces.sparsity_greedy`; its path is searched once per method and cached beside the
  study), or `free` (one level per layer, `l0..l{L-1}`).
The section's thresholds are calibrated for the sampled levels on calibration text (`prepare` keeps the
batches), sequentially as `policies.sparsity.calibrate_thresholds` does, so a policy file needs no
calibration at inference time.

Presets: TEAL uniform 40% and 50% (the paper's headline levels).

Kernels: `prepare` profiles the sparse-row kernels against the dense GEMV for this model's group shapes on
this device (`search_spaces.sparsity_profiler`) and calibrates the runtime's per-group overheads from real decodes
(`search_spaces.sparsity_cost`); a section gets a `kernels` row per layer naming, for each group, the
kernel predicted fastest at its level, overheads included (`choose_kernels`), and none when dense wins
everywhere (the usual case for `builtin:tiny` on a CPU, see `benchmarks/RESULTS.md`). The cost hook predicts
the workload's latency from the same two measurements.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from policies.sparsity import GROUPS, calibrate_thresholds, group_linears
from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace
from search_spaces.sparsity_cost import Overheads

ALLOCATIONS = ("uniform", "owl", "greedy", "free")
CALIBRATION_REPEATS = 5  # interleaved decodes per configuration when calibrating the cost model's overheads
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


def calibration_batches(ctx: SearchContext, tokenizer: Any, device: Any) -> list[torch.Tensor]:
    """The calibration text (three held-out stdlib code samples, seed 2024) as token ids on `device`; shared
    with the weight-sparsity space."""
    texts = ctx.study_inputs().calibration_texts(3, seed=2024, n_chars=1500)
    return [tokenizer(t, return_tensors="pt").input_ids.to(device) for t in texts]


@dataclass
class SparsityCalibration:
    """What `prepare` measures (`ctx.prepared["sparsity"]`): the calibration batches thresholds are fitted
    on, OWL's outlier ratios, this device's kernel profile and the runtime's calibrated overheads; plus
    TEAL's greedy paths, searched on first use per method."""

    model: Any  # the model the thresholds are calibrated on
    batches: list[torch.Tensor]
    outliers: list[float]  # per layer (`outlier_ratios`)
    kernels: list[dict[str, Any]]  # `search_spaces.sparsity_profiler.profile_sparse_kernels` rows
    overheads: Overheads | None = None  # None only while `prepare` calibrates them
    greedy: dict[str, list] = field(default_factory=dict)  # method -> `sparsity_greedy.greedy_paths`


class SparsitySpace(SearchSpace):
    name = "sparsity"
    quality_metric = "accuracy"

    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> SparsityCalibration:
        """Calibration batches (held-out stdlib code), each layer's outlier ratio (for OWL), the kernel profile
        and the overheads of the runtime's masking and sparse paths."""
        batches = calibration_batches(ctx, tokenizer, device)
        calibration = SparsityCalibration(model=model, batches=batches, outliers=outlier_ratios(model, batches),
                                          kernels=_save_kernel_profile(ctx, model))
        calibration.overheads = self._calibrate_overheads(ctx, calibration, tokenizer, device)
        return calibration

    def _calibration(self, ctx: SearchContext) -> SparsityCalibration:
        return ctx.prepared_state(self.name, SparsityCalibration)

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        n = ctx.num_layers
        method = trial.suggest_categorical("sparsity.method", ["teal", "wina"])
        allocation = trial.suggest_categorical("sparsity.allocation", ALLOCATIONS)
        if allocation == "free":
            return self.section(ctx, method, [[trial.suggest_float(f"sparsity.l{i}", 0.0, 0.8)] * len(GROUPS)
                                              for i in range(n)])
        level = trial.suggest_float("sparsity.level", 0.1, 0.7)
        if allocation == "greedy":
            from search_spaces.sparsity_greedy import levels_for

            return self.section(ctx, method, levels_for(self.greedy_paths(ctx, method), level))
        if allocation == "owl":
            lam = trial.suggest_float("sparsity.lambda", 0.02, 0.15)
            levels = owl_levels(self._calibration(ctx).outliers or [0.0] * n, level, lam)
        else:
            levels = [level] * n
        return self.section(ctx, method, [[v] * len(GROUPS) for v in levels])

    def section(self, ctx: SearchContext, method: str, levels: list[list[float]]) -> dict[str, Any]:
        """The policy section for per-layer [qkv, o, gate_up, down] `levels`, calibrated (RuntimeError when
        `prepare` did not run: thresholds need the calibration batches)."""
        return self._section(self._calibration(ctx), method, levels)

    @staticmethod
    def _section(calibration: SparsityCalibration, method: str, levels: list[list[float]]) -> dict[str, Any]:
        rows = [[round(float(v), 4) for v in row] for row in levels]
        section: dict[str, Any] = {"method": method, "levels": rows}
        if not calibration.batches:
            raise RuntimeError("sparsity: prepare() must run before sections can be calibrated")
        thresholds = calibrate_thresholds(calibration.model, calibration.batches,
                                          [dict(zip(GROUPS, row, strict=True)) for row in rows], method=method)
        section["thresholds"] = [[round(t.get(g, 0.0), 6) for g in GROUPS] for t in thresholds]
        profile = calibration.kernels
        if profile:
            kernels = choose_kernels(profile, rows, calibration.overheads)
            if any(k != "dense" for row in kernels for k in row):
                section["kernels"] = kernels
        return section

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Predicted latency (or TTFT) of the workload with `section`, from the kernel profile and the
        calibrated overheads (`search_spaces.sparsity_cost`)."""
        from search_spaces.sparsity_cost import KernelTable, predict_latency_ms

        calibration = ctx.prepared_or_none(self.name, SparsityCalibration)
        if calibration is None or calibration.overheads is None or not calibration.kernels:
            return None
        ttft, latency = ctx.baseline_ms("ttft_ms"), ctx.baseline_ms("latency_ms")
        if ttft is None or latency is None:
            return None
        return predict_latency_ms(section, KernelTable(calibration.kernels), calibration.overheads,
                                  {"ttft_ms": ttft, "latency_ms": latency}, int(ctx.workload["new_tokens"]),
                                  ctx.objective)

    def greedy_paths(self, ctx: SearchContext, method: str) -> list:
        """TEAL's greedy allocation paths for `method`: searched on first use, cached in the calibration and
        as `sparsity-greedy-<method>.json` beside the study (a resumed study does not search again)."""
        import json

        from search_spaces.sparsity_greedy import greedy_paths

        calibration = self._calibration(ctx)
        if method in calibration.greedy:
            return calibration.greedy[method]
        artefacts = ctx.artefacts
        cached = artefacts / f"sparsity-greedy-{method}.json" if artefacts is not None else None
        if cached is not None and cached.is_file():
            paths = json.loads(cached.read_text())
        else:
            paths = greedy_paths(calibration.model, calibration.batches, method=method)
            if cached is not None:
                tmp = cached.with_suffix(".tmp")
                tmp.write_text(json.dumps(paths))
                tmp.replace(cached)
        calibration.greedy[method] = paths
        return paths

    def _calibrate_overheads(self, ctx: SearchContext, calibration: SparsityCalibration, tokenizer: Any,
                             device: Any) -> Overheads:
        """Measure dense, all-groups-masked (50%, dense kernel) and all-groups-sparse (80%, each group's fastest
        sparse kernel) decodes of this model on this device, for the cost model's per-group overheads."""
        from policies.runtime import apply_policy
        from policies.sparsity import SparsityRuntime
        from search_spaces.sparsity_cost import KernelTable, calibrate

        inputs = ctx.study_inputs()
        model = calibration.model
        n, new_tokens = ctx.num_layers, max(8, min(int(ctx.workload["new_tokens"]), 32))
        input_ids = inputs.timing_ids(tokenizer, int(ctx.workload["prompt_tokens"]), device)
        table = KernelTable(calibration.kernels)
        masked = self._section(calibration, "teal", [[0.5] * len(GROUPS)] * n)
        masked.pop("kernels", None)
        sparse = self._section(calibration, "teal", [[0.8] * len(GROUPS)] * n)
        sparse["kernels"] = [[table.fastest_sparse(i, g, 0.8) for g in GROUPS] for i in range(n)]

        configs = {"dense": None, "masked": masked, "sparse": sparse}
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for _ in range(CALIBRATION_REPEATS):  # interleaved, so that drift hits all three alike
            for name, section in configs.items():
                undo = SparsityRuntime().apply(model, section) if section is not None else None
                try:
                    with apply_policy(model, None) as dense:
                        ttft_ms, latency_ms = inputs.time_generation(dense.generate, input_ids, new_tokens, device)
                finally:
                    if undo is not None:
                        undo.remove()
                samples[name].append((ttft_ms, (latency_ms - ttft_ms) / (new_tokens - 1)))
        medians = {name: (statistics.median(t for t, _ in v), statistics.median(d for _, d in v))
                   for name, v in samples.items()}
        return calibrate(medians, masked, sparse, table)

    def presets(self, ctx: SearchContext) -> list[Preset]:
        presets = []
        for level in (0.4, 0.5):
            params = {"sparsity.method": "teal", "sparsity.allocation": "uniform", "sparsity.level": level}
            calibration = ctx.prepared_or_none(self.name, SparsityCalibration)
            if calibration is None:
                continue  # not prepared (e.g. `bench` without a study): the presets need calibration
            section = self._section(calibration, "teal", [[level] * len(GROUPS)] * ctx.num_layers)
            presets.append(Preset(f"teal-{round(level * 100)}", params, section,
                                  f"TEAL uniform {round(level * 100)}% on every projection's input"))
        return presets


def choose_kernels(profile: list[dict[str, Any]], levels: list[list[float]],
                   overheads: Any = None) -> list[list[str]]:
    """Per layer and group, the fastest kernel measured on this device at the highest profiled sparsity not
    above the group's level (a conservative reading: the real level is at least that sparse); `dense` unless
    a sparse kernel beat the dense GEMV there, by more than the sparse path's extra overhead when calibrated
    `overheads` (`search_spaces.sparsity_cost.Overheads`) are given."""
    penalty = 0.0 if overheads is None else overheads.sparse_us - overheads.mask_us
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
            times = dict(points[max(below)])
            times.update({k: v + penalty for k, v in times.items() if k != "dense"})
            choices.append(min(times, key=times.get))
        out.append(choices)
    return out


def _save_kernel_profile(ctx: SearchContext, model: Any) -> list[dict[str, Any]]:
    """Profile the sparse kernels against dense for this model's group shapes on this device; return the rows
    and write `sparsity-kernels.csv` beside the study (the report plots the break-even)."""
    import pandas as pd

    from search_spaces.sparsity_profiler import profile_sparse_kernels

    rows = profile_sparse_kernels(model)
    artefacts = ctx.artefacts
    if artefacts is not None:
        tmp = artefacts / "sparsity-kernels.csv.tmp"
        pd.DataFrame(rows).to_csv(tmp, index=False)
        tmp.replace(artefacts / "sparsity-kernels.csv")
    return rows


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
