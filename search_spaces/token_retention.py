"""Token-retention schedules: which fraction of the prompt each decoder layer keeps during prefill.

Five families, each a few parameters that an Optuna trial samples and that turn into a per-layer `keep`
list (non-increasing with depth, layer 0 always 1.0 so that the first layer sees every token and can
score them):

- `step`       FastV: keep everything up to layer K, then drop a ratio R.
- `stages`     PyramidDrop: n stage boundaries evenly spaced over depth, keep lambda^s after stage s.
- `prd_cosine` p-MoD's progressive ratio decay r_l = cos(l*pi/(L-1))/2 + alpha; values at or above `max`
               mean "keep all", values below `min` are raised to `min` (this reproduces the published
               shiftedcos_decay_0.85_0.15 schedule: 8 full layers, 0.844 -> 0.156, then 0.15, for L=32).
- `sigmoid`    a parametric sigmoid over relative depth (centre c, steepness k, floor m), as in
               "Accelerating MLLMs by Searching Optimal Vision Token Reduction" (arXiv 2412.00556).
- `free`       per-layer multiplicative decays in [0.5, 1], so any monotone schedule is reachable.

The cost hook predicts prefill latency from this device's per-layer curves: the sum over layers of
latency(layer, tokens kept there), plus the measured non-layer parts, plus a calibration offset (dense
TTFT measured minus dense predicted: the generate loop's fixed cost, which no schedule changes).
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace

FAMILIES = ("step", "stages", "prd_cosine", "sigmoid", "free")
SCORERS = ("attention", "l2norm")
WINDOWS = (1, 4, 8, 16)
SINKS = 4
MIN_KEEP = 0.02


def _finish(keep: list[float]) -> list[float]:
    """Layer 0 keeps all; clamp to [MIN_KEEP, 1]; enforce non-increasing; round for readable YAML."""
    out: list[float] = []
    for i, k in enumerate(keep):
        value = 1.0 if i == 0 else min(1.0, max(MIN_KEEP, float(k)))
        if out:
            value = min(value, out[-1])
        out.append(round(value, 4))
    return out


def step_schedule(n_layers: int, k: int, ratio: float) -> list[float]:
    """FastV: layers >= k keep (1 - ratio) of the tokens."""
    return _finish([1.0 if layer < k else 1.0 - ratio for layer in range(n_layers)])


def stage_boundaries(n_layers: int, n_stages: int) -> list[int]:
    """Evenly spaced stage starts: L/4, L/2, 3L/4 for three stages (PyramidDrop's [8, 16, 24] at L=32)."""
    return sorted({max(1, round(i * n_layers / (n_stages + 1))) for i in range(1, n_stages + 1)})


def stages_schedule(n_layers: int, n_stages: int, lam: float) -> list[float]:
    """PyramidDrop: after the s-th boundary keep lam**s."""
    bounds = stage_boundaries(n_layers, n_stages)
    return _finish([lam ** sum(layer >= b for b in bounds) for layer in range(n_layers)])


def prd_cosine_schedule(n_layers: int, alpha: float, hi: float, lo: float) -> list[float]:
    """p-MoD progressive ratio decay (shifted cosine), clipped as described in the module docstring."""
    keep = []
    for layer in range(n_layers):
        r = math.cos(layer * math.pi / max(n_layers - 1, 1)) / 2 + alpha
        keep.append(1.0 if r >= hi else max(r, lo))
    return _finish(keep)


def sigmoid_schedule(n_layers: int, centre: float, steepness: float, floor: float) -> list[float]:
    """keep(l) = floor + (1 - floor) / (1 + exp(steepness * (l/(L-1) - centre)))."""
    depth = max(n_layers - 1, 1)
    return _finish([floor + (1 - floor) / (1 + math.exp(steepness * (layer / depth - centre)))
                    for layer in range(n_layers)])


def free_schedule(decays: list[float]) -> list[float]:
    """keep[0] = 1, keep[l] = keep[l-1] * decays[l-1]."""
    keep = [1.0]
    for d in decays:
        keep.append(keep[-1] * d)
    return _finish(keep)


def schedule_from_params(params: dict[str, Any], n_layers: int) -> list[float]:
    """The keep list that a trial's (or a preset's) parameters describe."""
    family = params["token_retention.family"]
    if family == "step":
        return step_schedule(n_layers, params["token_retention.step.k"], params["token_retention.step.ratio"])
    if family == "stages":
        return stages_schedule(n_layers, params["token_retention.stages.n"], params["token_retention.stages.lambda"])
    if family == "prd_cosine":
        return prd_cosine_schedule(n_layers, params["token_retention.prd.alpha"], params["token_retention.prd.max"],
                                   params["token_retention.prd.min"])
    if family == "sigmoid":
        return sigmoid_schedule(n_layers, params["token_retention.sigmoid.centre"],
                                params["token_retention.sigmoid.steepness"], params["token_retention.sigmoid.floor"])
    if family == "free":
        return free_schedule([params[f"token_retention.free.d{i}"] for i in range(1, n_layers)])
    raise ValueError(f"unknown token-retention family {family!r}; choose one of {', '.join(FAMILIES)}")


def section_from_params(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    return {"keep": schedule_from_params(params, n_layers), "scorer": params["token_retention.scorer"],
            "window": int(params["token_retention.window"]), "sinks": SINKS}


class TokenRetentionSpace(SearchSpace):
    name = "token_retention"
    quality_metric = "accuracy"

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        n = ctx.num_layers
        family = trial.suggest_categorical("token_retention.family", FAMILIES)
        if family == "step":
            trial.suggest_int("token_retention.step.k", 1, max(1, n - 1))
            trial.suggest_float("token_retention.step.ratio", 0.1, 0.95)
        elif family == "stages":
            trial.suggest_int("token_retention.stages.n", 1, min(4, max(1, n - 1)))
            trial.suggest_float("token_retention.stages.lambda", 0.2, 0.9)
        elif family == "prd_cosine":
            trial.suggest_float("token_retention.prd.alpha", 0.1, 0.9)
            trial.suggest_float("token_retention.prd.max", 0.6, 1.0)
            trial.suggest_float("token_retention.prd.min", 0.03, 0.5)
        elif family == "sigmoid":
            trial.suggest_float("token_retention.sigmoid.centre", 0.0, 1.0)
            trial.suggest_float("token_retention.sigmoid.steepness", 2.0, 30.0)
            trial.suggest_float("token_retention.sigmoid.floor", 0.03, 0.9)
        else:
            for i in range(1, n):
                trial.suggest_float(f"token_retention.free.d{i}", 0.3, 1.0)
        trial.suggest_categorical("token_retention.scorer", SCORERS)
        trial.suggest_categorical("token_retention.window", WINDOWS)
        return section_from_params(trial.params, n)

    def presets(self, ctx: SearchContext) -> list[Preset]:
        n = ctx.num_layers
        common = {"token_retention.scorer": "attention", "token_retention.window": 8}
        fastv = {"token_retention.family": "step", "token_retention.step.k": max(1, round(2 * n / 32)),
                 "token_retention.step.ratio": 0.5, **common}
        pmod = {"token_retention.family": "prd_cosine", "token_retention.prd.alpha": 0.5,
                "token_retention.prd.max": 0.85, "token_retention.prd.min": 0.15, **common}
        pdrop = {"token_retention.family": "stages", "token_retention.stages.n": 3,
                 "token_retention.stages.lambda": 0.5, **common}
        return [
            Preset("fastv", fastv, section_from_params(fastv, n), "FastV K=2 (of 32 layers, scaled), R=50%"),
            Preset("pmod", pmod, section_from_params(pmod, n), "p-MoD shiftedcos_decay_0.85_0.15, alpha 0.5"),
            Preset("pyramiddrop", pdrop, section_from_params(pdrop, n),
                   "PyramidDrop stages L/4, L/2, 3L/4, lambda 0.5"),
        ]

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Predicted objective (TTFT, or end-to-end latency with decode) of `section` on this device."""
        if ctx.curves is None:
            return None
        cost = _cost_model(ctx)
        return cost.predict(section)


class RetentionCostModel:
    """latency(schedule) = sum over layers of latency(layer, tokens kept there) + a calibrated constant.

    The constant is (dense measured) - (dense predicted from the layer curves): embeddings, the final
    norm and LM head on the last row, and the generate loop do not depend on the schedule. For the
    `latency_ms` objective the decode steps are added: each step's layer l attends over the tokens it kept
    plus the tokens decoded so far (evaluated at the mean decode position).
    """

    def __init__(self, ctx: SearchContext):
        from profilers.layer_profiler import CurveInterpolator

        self.curves = CurveInterpolator(ctx.curves)
        self.n_layers = ctx.num_layers
        self.prompt = int(ctx.workload["prompt_tokens"])
        self.new_tokens = int(ctx.workload["new_tokens"])
        self.objective = ctx.extras.get("objective", "ttft_ms")
        dense_counts = [self.prompt] * self.n_layers
        measured = ctx.extras.get("baseline", {}).get(self.objective)
        self.offset = 0.0 if measured is None else float(measured) - self._layers_ms(dense_counts)

    def _layers_ms(self, counts: list[int]) -> float:
        total = sum(self.curves.latency("decoder_layer", n, n, layer_index=i, mode="prefill")
                    for i, n in enumerate(counts))
        if self.objective == "latency_ms" and self.new_tokens > 1:
            mid = (self.new_tokens - 1) / 2
            total += (self.new_tokens - 1) * sum(
                self.curves.latency("decoder_layer", 1, n + mid, layer_index=i, mode="decode")
                for i, n in enumerate(counts))
        return total

    def predict(self, section: dict[str, Any]) -> float:
        from policies.token_retention import kept_counts_for_section

        return self._layers_ms(kept_counts_for_section(section, self.prompt)) + self.offset


def _cost_model(ctx: SearchContext) -> RetentionCostModel:
    """One cost model per context (grouping the curves once keeps predictions cheap inside a study)."""
    model = ctx.extras.get("_token_retention_cost")
    if model is None:
        model = ctx.extras["_token_retention_cost"] = RetentionCostModel(ctx)
    return model
register_search_space(TokenRetentionSpace())
