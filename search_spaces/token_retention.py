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
- `free`       multiplicative decays in [0.3, 1] over up to FREE_SEGMENTS equal runs of layers (one per layer
               on a model of 7 layers or fewer), so any monotone step schedule over those runs is reachable. Not
               one per layer on a deep model: 29 dimensions for SmolLM2's 30 layers, which a budget of tens of
               trials cannot learn.

The cost hook predicts prefill latency from this device's per-layer curves: the sum over layers of
latency(layer, tokens kept there), scaled, plus a fixed part and a cost per drop point, calibrated in `prepare`
from real generate calls on this device (`calibrate`): the per-drop cost on a short prompt, the scale and fixed
part on five reference schedules at the workload's length. The per-drop cost is the runtime's own work where
tokens are dropped (window attention scores, the top-k selection, slicing rows and positions): 0.5-1 ms per drop
point on a 2-core CPU, 10-15% of a pruned prefill of builtin:tiny, which layer curves alone under-predict.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from policies.token_retention import DEFAULTS, SCORERS
from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace
from search_spaces.token_retention_screen import SCREEN_EXAMPLES, Ranking, RankingScreen, candidates, screen_rankings

FAMILIES = ("step", "stages", "prd_cosine", "sigmoid", "free")
WINDOWS = (1, 4, 8, 16, 32)
#: Max-pool kernels for the scores (1: off). A small model's attention marks a token or two of a fact: on
#: SmolLM2-135M at 2k-token passkey prompts, no schedule kept the key without pooling, and kernel 15 kept it
#: at 2.8x TTFT (benchmarks/RESULTS.md).
POOLS = (1, 7, 15, 31)
SINKS = DEFAULTS["sinks"]  # sampled sections keep the runtime's default attention sinks
MIN_KEEP = 0.02
FREE_SEGMENTS = 6


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


def free_segments(n_layers: int) -> int:
    """How many decays the `free` family samples for a model of `n_layers` layers."""
    return max(1, min(FREE_SEGMENTS, n_layers - 1))


def free_schedule(decays: list[float], n_layers: int | None = None) -> list[float]:
    """keep[0] = 1; layers 1.. form len(decays) equal runs, run s keeping the product of decays[:s + 1].
    With one decay per layer (`n_layers` omitted or len(decays) + 1) that is keep[l] = keep[l-1] * decays[l-1]."""
    n = len(decays) + 1 if n_layers is None else n_layers
    keep = [1.0]
    for layer in range(1, n):
        segment = (layer - 1) * len(decays) // max(n - 1, 1)
        keep.append(math.prod(decays[:segment + 1]))
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
        return free_schedule([params[f"token_retention.free.d{i}"] for i in range(1, free_segments(n_layers) + 1)],
                             n_layers)
    raise ValueError(f"unknown token-retention family {family!r}; choose one of {', '.join(FAMILIES)}")


def section_from_params(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """The section a trial's (or a preset's) parameters describe."""
    return {"keep": schedule_from_params(params, n_layers), "scorer": params["token_retention.scorer"],
            "window": int(params["token_retention.window"]), "sinks": SINKS,
            "pool": int(params["token_retention.pool"])}


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
            for i in range(1, free_segments(n) + 1):
                trial.suggest_float(f"token_retention.free.d{i}", 0.3, 1.0)
        trial.suggest_categorical("token_retention.scorer", SCORERS)
        trial.suggest_categorical("token_retention.window", WINDOWS)
        trial.suggest_categorical("token_retention.pool", POOLS)
        return section_from_params(trial.params, n)

    def presets(self, ctx: SearchContext) -> list[Preset]:
        n = ctx.num_layers
        # as published: the last tokens' mean attention, unpooled
        common = {"token_retention.scorer": "attention", "token_retention.window": 8, "token_retention.pool": 1}
        fastv = {"token_retention.family": "step", "token_retention.step.k": max(1, round(2 * n / 32)),
                 "token_retention.step.ratio": 0.5, **common}
        pmod = {"token_retention.family": "prd_cosine", "token_retention.prd.alpha": 0.5,
                "token_retention.prd.max": 0.85, "token_retention.prd.min": 0.15, **common}
        pdrop = {"token_retention.family": "stages", "token_retention.stages.n": 3,
                 "token_retention.stages.lambda": 0.5, **common}
        # PyramidDrop's schedule ranked as SnapKV ranks prompt rows: a 32-token observation window, scores pooled
        # over 7 neighbours (SnapKV, arXiv 2404.14469; its reference code pools with kernels of 5-7)
        snap = {**pdrop, "token_retention.window": 32, "token_retention.pool": 7}
        paper = [
            Preset("fastv", fastv, section_from_params(fastv, n), "FastV K=2 (of 32 layers, scaled), R=50%"),
            Preset("pmod", pmod, section_from_params(pmod, n), "p-MoD shiftedcos_decay_0.85_0.15, alpha 0.5"),
            Preset("pyramiddrop", pdrop, section_from_params(pdrop, n),
                   "PyramidDrop stages L/4, L/2, 3L/4, lambda 0.5"),
            Preset("pyramiddrop-snapkv", snap, section_from_params(snap, n),
                   "PyramidDrop's stages, rows ranked by SnapKV's pooled window attention (window 32, kernel 7)"),
        ]
        return paper + self._screened_presets(ctx, pdrop)

    def _screened_presets(self, ctx: SearchContext, pdrop: dict[str, Any]) -> list[Preset]:
        """Study starts from `prepare`'s ranking screen (none without it, e.g. in `bench`): PyramidDrop's schedule,
        and PyramidDrop's stages at the gentlest lambda the cost model predicts 2x faster than dense, both ranked
        the way the screen found best on this model. Not paper presets: the sampler's first informed trials."""
        state = ctx.prepared_or_none(self.name, TokenRetentionState)
        if state is None or state.screen is None or not state.screen.hit_rate:
            return []
        n = ctx.num_layers
        best = state.screen.best(screen_candidates())
        ranking = {"token_retention.scorer": best.scorer, "token_retention.window": best.window,
                   "token_retention.pool": best.pool}
        hit_rate = state.screen.hit_rate[best.key]
        how = f"ranked {best.key} (hit rate {hit_rate:.2f} of the answer's most-read rows at keep {state.screen.keep})"
        out = [Preset("pyramiddrop+screen", {**pdrop, **ranking}, section_from_params({**pdrop, **ranking}, n),
                      f"PyramidDrop's schedule, {how}")]
        if state.calibration is not None:
            dense_ms = self.predict_ms({**section_from_params({**pdrop, **ranking}, n), "keep": [1.0] * n}, ctx)
            for lam in SCREENED_LAMBDAS:
                params = {**pdrop, **ranking, "token_retention.stages.lambda": lam}
                predicted = self.predict_ms(section_from_params(params, n), ctx)
                if dense_ms is not None and predicted is not None and predicted <= dense_ms / SCREENED_SPEEDUP:
                    break
            if lam != pdrop["token_retention.stages.lambda"]:
                out.append(Preset(f"stages-{lam:g}+screen", params, section_from_params(params, n),
                                  f"PyramidDrop's stages at lambda {lam:g}, the gentlest predicted "
                                  f"{SCREENED_SPEEDUP:g}x faster than dense, {how}"))
        return out

    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> TokenRetentionState:
        """Calibrate the cost model on real generate calls (see `calibrate`); needs the profile's curves
        (without them: no calibration, and no cost model either)."""
        screen = _screen(ctx, model, tokenizer, device)
        if ctx.curves is None:
            return TokenRetentionState(calibration=None, screen=screen)
        calibration = calibrate(ctx, model, device)
        artefacts = ctx.artefacts
        if artefacts is not None:  # beside the study, for anyone asking why a trial was predicted as it was
            path = Path(artefacts) / "token_retention_calibration.json"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(asdict(calibration), indent=2))
            os.replace(tmp, path)
        return TokenRetentionState(calibration=calibration, screen=screen)

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Predicted objective (TTFT, or end-to-end latency with decode) of `section` on this device."""
        if ctx.curves is None:
            return None
        cost = _cost_model(ctx)
        return cost.predict(section)


CALIBRATION_REPEATS = 5
#: Seconds the calibration's rounds may take after the first: five rounds of five schedules at a real model's
#: 2k-token prompt were over six minutes on a 2-core CPU; a median of fewer rounds is what fits.
CALIBRATION_BUDGET_S = 60.0


@dataclass(frozen=True)
class LinearCost:
    """measured = scale * (curve prediction) + per_event * (events) + fixed, fitted on the calibration runs."""

    scale: float = 1.0
    per_event_ms: float = 0.0
    fixed_ms: float = 0.0

    def __call__(self, layers_ms: float, events: float) -> float:
        return self.scale * layers_ms + self.per_event_ms * events + self.fixed_ms

    @classmethod
    def fit(cls, points: list[tuple[float, float, float]], per_event: float | None = None) -> LinearCost:
        """Least squares over (curve prediction, events, measured) points.

        With `per_event` measured separately (prefill: `per_drop_ms`), the scale and fixed part are fitted
        around it; without (decode), the per-event and fixed part at scale 1 (the references' decode layer
        costs barely differ, so they cannot determine a scale). A fit is kept only when the points determine
        it (full rank) and it is physical: a scale of 0.7-1.5 (the curves were measured in this model on this
        device moments earlier), no negative per-event or fixed cost (those come from noise). Else one offset
        at scale 1."""
        x = np.array([[p[0], p[1], 1.0] for p in points])
        y = np.array([p[2] for p in points])
        if per_event is not None:
            rest = y - per_event * x[:, 1]
            (scale, fixed), _, rank, _ = np.linalg.lstsq(x[:, [0, 2]], rest, rcond=None)
            if rank == 2 and 0.7 <= scale <= 1.5 and fixed >= 0:
                return cls(float(scale), per_event, float(fixed))
            return cls(1.0, per_event, float(np.mean(rest - x[:, 0])))
        (per_event, fixed), _, rank, _ = np.linalg.lstsq(x[:, 1:], y - x[:, 0], rcond=None)
        if rank == 2 and per_event >= 0 and fixed >= 0:
            return cls(1.0, float(per_event), float(fixed))
        return cls(1.0, 0.0, float(np.mean(y - x[:, 0])))


@dataclass(frozen=True)
class RetentionCalibration:
    """How real generate calls on this device relate to the layer curves. `prefill` predicts TTFT from the
    prefill curves and the number of drop points; `decode_step` one decode step from the decode curves and the
    number of pruned layers (whose slot bookkeeping and masks run every step)."""

    prefill: LinearCost
    decode_step: LinearCost
    points: tuple[dict[str, Any], ...] = ()


def _events(counts: list[int]) -> tuple[int, int]:
    """(drop points, pruned layers) of per-layer kept counts."""
    drops = sum(1 for i in range(1, len(counts)) if counts[i] < counts[i - 1])
    return drops, sum(1 for c in counts if c < counts[0])


def reference_schedules(n_layers: int) -> dict[str, list[float]]:
    """Dense; `light` drops a few tokens at every layer (layer costs ~ dense, every drop point paid); `one_drop`
    halves the prompt once (FastV-like: half the layer cost, one drop point); `medium` and `steep` decay at
    every layer (smaller layer costs, every drop point). Five points for three unknowns, so that one disturbed
    measurement on a busy machine cannot set the fit alone."""
    def decay(rate: float) -> list[float]:
        return [1.0] + [round(max(MIN_KEEP, rate ** i), 4) for i in range(1, n_layers)]

    return {"dense": [1.0] * n_layers, "light": decay(0.97), "one_drop": [1.0] + [0.5] * (n_layers - 1),
            "medium": decay(0.8), "steep": decay(0.5)}


PER_DROP_TOKENS = 128  # the short prompt on which the runtime's own cost per drop point is measured
PER_DROP_REPEATS = 15


def _interleaved_medians(model: Any, device: Any, input_ids: Any, sections: dict[str, dict[str, Any] | None],
                         new_tokens: int, repeats: int,
                         budget_s: float | None = None) -> dict[str, tuple[float, float]]:
    """{name: (median TTFT, median decode step)} of generate calls with each section applied (None: dense),
    interleaved `repeats` times so that drift on a busy machine hits all of them alike. With `budget_s`, the
    rounds after the first are cut to what fits in it (at least two rounds in all)."""
    import time

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sections}
    rounds, done, started = repeats, 0, time.perf_counter()
    while done < rounds:
        for name, section in sections.items():
            samples[name].append(_time_schedule(model, device, input_ids, section, new_tokens))
        done += 1
        if done == 1 and budget_s is not None:
            round_s = time.perf_counter() - started
            rounds = max(2, min(repeats, int(budget_s / max(round_s, 1e-9))))
    return {name: (statistics.median(t for t, _ in v), statistics.median(d for _, d in v))
            for name, v in samples.items()}


#: Calls shorter than this are timed twice in a row, the second time counted (see `_time_schedule`).
WARMUP_BELOW_MS = 1000.0


def _time_schedule(model: Any, device: Any, input_ids: Any, section: dict[str, Any] | None,
                   new_tokens: int) -> tuple[float, float]:
    """(TTFT, decode step) in ms of one generate call pair with `section` applied (None: dense).

    Switching schedules changes every tensor size, and the first call after a switch pays for it (allocator,
    kernel caches), which a trial timed back to back never does (measured: 15-20% slower on builtin:tiny), so a
    short call is timed again and the second time kept. Beside a call of a second or more that cost is lost in
    the noise, and timing it twice would double the calibration's time at a real model's prompt lengths."""
    import torch

    from policies.runtime import apply_policy
    from policies.token_retention import TokenRetentionRuntime
    from profilers.timing import time_callable

    undo = TokenRetentionRuntime().apply(model, section) if section is not None else None
    try:
        with apply_policy(model, None) as handle, torch.inference_mode():
            def timed(n: int, generate: Any = handle.generate) -> float:
                def once() -> float:
                    return time_callable(lambda: generate(input_ids, max_new_tokens=n, min_new_tokens=n), device,
                                         warmup=0, repeats=1).median_ms

                ms = once()
                return once() if ms < WARMUP_BELOW_MS else ms

            ttft = timed(1)
            full = timed(new_tokens) if new_tokens > 1 else ttft
    finally:
        if undo is not None:
            undo.remove()
    return ttft, (full - ttft) / (new_tokens - 1) if new_tokens > 1 else 0.0


def _section(keep: list[float]) -> dict[str, Any]:
    return {"keep": keep, "scorer": "attention", "window": DEFAULTS["window"], "sinks": SINKS, "min_prompt_tokens": 1}


def _random_ids(model: Any, n: int, device: Any) -> Any:
    import torch

    vocab = int(model.get_input_embeddings().weight.shape[0])
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0)).to(device)


def per_drop_ms(ctx: SearchContext, model: Any, device: Any, repeats: int = PER_DROP_REPEATS) -> float:
    """The runtime's own cost per drop point (scoring, top-k, slicing), measured where it is not lost in the
    noise of a long prefill: on a short prompt, a schedule dropping a few tokens at every layer against dense,
    minus what the curves say the fewer tokens save. It hardly depends on the prompt's length (Python and
    small ops), so it carries over to the workload's."""
    from policies.token_retention import kept_counts_for_section

    n = min(int(ctx.workload["prompt_tokens"]), PER_DROP_TOKENS)
    light = reference_schedules(ctx.num_layers)["light"]
    medians = _interleaved_medians(model, device, _random_ids(model, n, device),
                                   {"dense": None, "light": _section(light)}, 1, repeats)
    counts = kept_counts_for_section(_section(light), n)
    drops, _ = _events(counts)
    if drops == 0:
        return 0.0
    curves = _Curves(ctx)
    saved = curves.prefill_ms([n] * ctx.num_layers) - curves.prefill_ms(counts)
    return max(0.0, (medians["light"][0] - medians["dense"][0] + saved) / drops)


def calibrate(ctx: SearchContext, model: Any, device: Any, repeats: int = CALIBRATION_REPEATS) -> RetentionCalibration:
    """The per-drop cost from a short prompt (`per_drop_ms`), then the layer-cost scale and fixed part from
    medians of `repeats` interleaved generate calls (TTFT and full latency) of the reference schedules at the
    workload's length. Random token ids: what a prefill costs does not depend on which tokens it holds."""
    from policies.token_retention import kept_counts_for_section

    prompt, new = int(ctx.workload["prompt_tokens"]), int(ctx.workload["new_tokens"])
    per_drop = per_drop_ms(ctx, model, device)
    sections = {name: _section(keep) for name, keep in reference_schedules(ctx.num_layers).items()}
    medians = _interleaved_medians(model, device, _random_ids(model, prompt, device),
                                   {name: (None if name == "dense" else sec) for name, sec in sections.items()},
                                   new, repeats, budget_s=CALIBRATION_BUDGET_S)
    curves = _Curves(ctx)
    prefill_pts, decode_pts, points = [], [], []
    for name, section in sections.items():
        counts = kept_counts_for_section(section, prompt)
        drops, pruned = _events(counts)
        ttft, step = medians[name]
        prefill_pts.append((curves.prefill_ms(counts), drops, ttft))
        decode_pts.append((curves.decode_step_ms(counts, new), pruned, step))
        points.append({"schedule": name, "counts": counts, "ttft_ms": round(ttft, 4), "decode_step_ms": round(step, 4)})
    decode = LinearCost.fit(decode_pts) if new > 1 else LinearCost()
    return RetentionCalibration(LinearCost.fit(prefill_pts, per_event=per_drop), decode, tuple(points))


class _Curves:
    """The layer curves, read the way the cost model reads them."""

    def __init__(self, ctx: SearchContext) -> None:
        from profilers.layer_profiler import CurveInterpolator

        self.curves = CurveInterpolator(ctx.curves)

    def prefill_ms(self, counts: list[int]) -> float:
        return sum(self.curves.latency("decoder_layer", n, n, layer_index=i, mode="prefill")
                   for i, n in enumerate(counts))

    def decode_step_ms(self, counts: list[int], new_tokens: int) -> float:
        """One decode step at the mean decode position: layer l attends over what it kept plus the new tokens."""
        mid = (new_tokens - 1) / 2
        return sum(self.curves.latency("decoder_layer", 1, n + mid, layer_index=i, mode="decode")
                   for i, n in enumerate(counts))


class RetentionCostModel:
    """TTFT(schedule) = prefill fit(sum over layers of latency(layer, tokens kept there), drop points); for the
    `latency_ms` objective plus (new_tokens - 1) decode steps, each decode fit(layer decode latencies over the
    kept tokens plus those decoded so far, pruned layers).

    Without a calibration (a context that was not prepared) the fits degrade to one offset: dense measured
    minus dense predicted, from the study's baseline (none measured: no offset)."""

    def __init__(self, ctx: SearchContext, calibration: RetentionCalibration | None):
        self.curves = _Curves(ctx)
        self.n_layers = ctx.num_layers
        self.prompt = int(ctx.workload["prompt_tokens"])
        self.new_tokens = int(ctx.workload["new_tokens"])
        self.objective = ctx.objective
        if calibration is None:
            dense = [self.prompt] * self.n_layers
            measured = ctx.baseline_ms(self.objective)
            offset = 0.0 if measured is None else float(measured) - self._uncalibrated_ms(dense)
            calibration = RetentionCalibration(LinearCost(fixed_ms=offset), LinearCost())
        self.calibration = calibration

    def _uncalibrated_ms(self, counts: list[int]) -> float:
        total = self.curves.prefill_ms(counts)
        if self.objective == "latency_ms" and self.new_tokens > 1:
            total += (self.new_tokens - 1) * self.curves.decode_step_ms(counts, self.new_tokens)
        return total

    def predict_counts(self, counts: list[int]) -> float:
        drops, pruned = _events(counts)
        total = self.calibration.prefill(self.curves.prefill_ms(counts), drops)
        if self.objective == "latency_ms" and self.new_tokens > 1:
            step = self.calibration.decode_step(self.curves.decode_step_ms(counts, self.new_tokens), pruned)
            total += (self.new_tokens - 1) * step
        return total

    def predict(self, section: dict[str, Any]) -> float:
        from policies.token_retention import kept_counts_for_section

        return self.predict_counts(kept_counts_for_section(section, self.prompt))


@dataclass
class TokenRetentionState:
    """What `prepare` returns (`ctx.prepared["token_retention"]`): the calibration (None without curves), and
    the cost model built from it on the first prediction (grouping the curves once keeps predictions cheap
    inside a study; built then, since it reads the baseline and objective the tuner sets after `prepare`)."""

    calibration: RetentionCalibration | None
    cost_model: RetentionCostModel | None = None
    screen: RankingScreen | None = None


#: The stages lambdas a screened start may take, gentlest first, and the predicted speed-up it must reach.
SCREENED_LAMBDAS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)
SCREENED_SPEEDUP = 2.0


def screen_candidates() -> list[Ranking]:
    """Every ranking the search samples."""
    return candidates(SCORERS, WINDOWS, POOLS)


def _screen(ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> RankingScreen | None:
    """The ranking screen on the trials' first examples (None without a tuner's inputs or examples), written
    beside the study."""
    inputs = ctx.inputs
    prompts = inputs.task_prompts(tokenizer, SCREEN_EXAMPLES, device) if inputs is not None else []
    if not prompts:
        return None
    screen = screen_rankings(model, prompts, screen_candidates())
    if ctx.artefacts is not None:
        path = Path(ctx.artefacts) / "token_retention_screen.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(screen), indent=2))
        os.replace(tmp, path)
    return screen


def _cost_model(ctx: SearchContext) -> RetentionCostModel:
    """The prepared context's cached cost model; an unprepared context (tests, a one-off prediction) gets an
    uncalibrated one, built per call."""
    state = ctx.prepared_or_none(TokenRetentionSpace.name, TokenRetentionState)
    if state is None:
        return RetentionCostModel(ctx, calibration=None)
    if state.cost_model is None:
        state.cost_model = RetentionCostModel(ctx, state.calibration)
    return state.cost_model
register_search_space(TokenRetentionSpace())
