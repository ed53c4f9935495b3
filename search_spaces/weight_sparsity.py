"""Weight sparsity levels per layer (magnitude / Wanda), chosen by the tuner.

Parameters an Optuna trial samples (`weight_sparsity.*`):
- `method`: `magnitude` (smallest |W| of each matrix) or `wanda` (|W| times the input-channel norm, per row);
- `allocation`: `uniform` (one `level` everywhere) or `owl` (OWL, Yin et al. 2024: layers with a larger share
  of outlier activations get proportionally lower sparsity, within +/- `lambda` of the mean `level`). The outlier
  ratios are the activation ones of `search_spaces.sparsity` (|x| above 5x the layer's mean), shared with the
  activation-sparsity space, rather than OWL's own outliers of the Wanda score;
- `level`: the mean fraction of weights zeroed, 0.1 .. 0.7.
Wanda sections carry the input-channel norms, calibrated per trial on the calibration text `prepare` keeps,
layer by layer with the earlier layers already pruned at the trial's levels (`policies.weight_sparsity.input_norms`),
so a policy file needs no calibration at inference time.

Presets: Wanda uniform 50% and magnitude uniform 50% (the Wanda paper's headline unstructured setting and its
baseline).

Structure: only unstructured sparsity is searched. 2:4 is the one structure that runs faster, but only on CUDA
sm80+ in fp16/bf16 (`structure: "2:4"` in a hand-written section).

No cost hook (`predict_ms`): unstructured zeros in dense weights leave the dense kernels doing the same work, so
every trial's latency is the dense latency; the study is a search for the quality at each sparsity level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
import torch

from policies.sparsity import GROUPS
from policies.weight_sparsity import METHODS, encode_norms, input_norms
from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace
from search_spaces.sparsity import calibration_batches, outlier_ratios, owl_levels

ALLOCATIONS = ("uniform", "owl")
PRESET_LEVEL = 0.5


@dataclass
class WeightSparsityCalibration:
    """What `prepare` measures (`ctx.prepared["weight_sparsity"]`): the calibration batches Wanda's norms are
    computed on, and OWL's per-layer outlier ratios."""

    model: Any  # the model Wanda's norms are calibrated on
    batches: list[torch.Tensor]
    outliers: list[float]


class WeightSparsitySpace(SearchSpace):
    name = "weight_sparsity"
    quality_metric = "accuracy"

    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> WeightSparsityCalibration:
        """Calibration batches (held-out stdlib code, as for activation sparsity) and each layer's outlier
        ratio (for OWL)."""
        batches = calibration_batches(ctx, tokenizer, device)
        return WeightSparsityCalibration(model=model, batches=batches, outliers=outlier_ratios(model, batches))

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        n = ctx.num_layers
        method = trial.suggest_categorical("weight_sparsity.method", list(METHODS))
        allocation = trial.suggest_categorical("weight_sparsity.allocation", list(ALLOCATIONS))
        level = trial.suggest_float("weight_sparsity.level", 0.1, 0.7)
        if allocation == "owl":
            lam = trial.suggest_float("weight_sparsity.lambda", 0.02, 0.15)
            calibration = ctx.prepared_state(self.name, WeightSparsityCalibration)
            levels = owl_levels(calibration.outliers or [0.0] * n, level, lam)
        else:
            levels = [level] * n
        return self.section(ctx, method, levels)

    def section(self, ctx: SearchContext, method: str, levels: list[float]) -> dict[str, Any]:
        """The policy section for per-layer `levels` (every group of a layer at its level); Wanda's norms are
        calibrated here, for exactly these levels."""
        rows = [[round(float(v), 4)] * len(GROUPS) for v in levels]
        section: dict[str, Any] = {"method": method, "levels": rows}
        if method == "wanda":
            calibration = ctx.prepared_or_none(self.name, WeightSparsityCalibration)
            if calibration is None or not calibration.batches:
                raise RuntimeError("weight_sparsity: prepare() must run before Wanda sections can be calibrated")
            norms = input_norms(calibration.model, calibration.batches, levels=rows)
            section["norms"] = [[encode_norms(layer[g]) for g in GROUPS] for layer in norms]
        return section

    def presets(self, ctx: SearchContext) -> list[Preset]:
        presets = []
        percent = round(PRESET_LEVEL * 100)
        for method in ("wanda", "magnitude"):
            params = {"weight_sparsity.method": method, "weight_sparsity.allocation": "uniform",
                      "weight_sparsity.level": PRESET_LEVEL}
            try:
                section = self.section(ctx, method, [PRESET_LEVEL] * ctx.num_layers)
            except RuntimeError:
                continue  # not prepared (e.g. `bench` without a study): Wanda needs calibration
            presets.append(Preset(f"{method}-{percent}", params, section,
                                  f"{method.capitalize()} uniform {percent}% unstructured on every projection"))
        return presets


register_search_space(WeightSparsitySpace())
