"""The tuning face of a technique: parameters an Optuna trial samples, paper presets, a cost hook.

A technique plug-in has four faces (DESIGN.md): this search space, a runtime in `policies/` registered
under the same name, a cost hook (`predict_ms`, from the device profile) and, for lossy techniques, a
quality hook (`quality_metric`: which metric its loss shows up in). Optionally a fifth, `peers`: other
systems' implementations of the technique (e.g. Hugging Face assisted generation), benchmarked beside the
policy by `autotune bench`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:  # torch only for annotations: importing a search space stays cheap
    import torch


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
    params: dict[str, Any] | None  # None: not expressible as trial parameters (bench shows it, tune skips it)
    section: dict[str, Any]
    source: str = ""


@dataclass(frozen=True)
class Peer:
    """A reference implementation shown next to the policy in `autotune bench` (not a policy).

    `generate(input_ids, max_new_tokens=..., min_new_tokens=..., **kw) -> ids` runs on the dense model (the
    bench applies no policy while a peer runs) and is timed and quality-scored exactly like a policy's
    generate. `source` says what it is (library, version, settings).
    """

    name: str
    generate: Callable[..., torch.Tensor]
    source: str = ""


class SearchSpace:
    """Base class: subclasses set `name` and implement `suggest`; the rest has sensible defaults."""

    name: str = ""
    quality_metric: str = "accuracy"
    #: A lossless technique (speculative decoding) must reproduce dense greedy output exactly; `tune` fails
    #: any trial of a study made only of lossless techniques whose greedy output differs in a token.
    lossless: bool = False

    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> None:
        """Measure what the cost hook needs on this device (once per study, before any trial); results go in
        `ctx.extras`. Default: nothing (the per-layer curves in `ctx.curves` suffice)."""

    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        """Sample this technique's policy section from the trial."""
        raise NotImplementedError

    def presets(self, ctx: SearchContext) -> list[Preset]:
        """Paper presets, enqueued as the first trials of every study and shown in `autotune bench`."""
        return []

    def peers(self, model: Any, section: dict[str, Any], ctx: SearchContext) -> list[Peer]:
        """Other systems' implementations of this technique, benchmarked beside the policy (default: none).

        `section` is the policy's section for this technique (e.g. to use the same draft model)."""
        return []

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Cost hook: predicted latency of `section` on this device from the profile (None: no model)."""
        return None
