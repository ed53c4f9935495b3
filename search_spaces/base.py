"""The tuning face of a technique: parameters an Optuna trial samples, paper presets, a cost hook.

A technique plug-in has four faces (DESIGN.md): this search space, a runtime in `policies/` registered
under the same name, a cost hook (`predict_ms`, from the device profile) and, for lossy techniques, a
quality hook (`quality_metric`: which metric its loss shows up in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna


@dataclass
class SearchContext:
    """What a search space may look at: the model's shape, the workload and this device's profile."""

    model_fingerprint: dict[str, Any]
    workload: dict[str, Any]
    device: dict[str, Any]
    curves: Any = None  # pandas DataFrame from profilers.layer_profiler.profile_curves, or None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model_fingerprint["num_layers"])


@dataclass(frozen=True)
class Preset:
    """A configuration from a paper, scaled to the model: trial params to enqueue and the policy section."""

    name: str
    params: dict[str, Any]
    section: dict[str, Any]
    source: str = ""


class SearchSpace:
    """Base class: subclasses set `name` and implement `suggest`; the rest has sensible defaults."""

    name: str = ""
    quality_metric: str = "accuracy"

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        """Sample this technique's policy section from the trial."""
        raise NotImplementedError

    def presets(self, ctx: SearchContext) -> list[Preset]:
        """Paper presets, enqueued as the first trials of every study and shown in `autotune bench`."""
        return []

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Cost hook: predicted latency of `section` on this device from the profile (None: no model)."""
        return None
