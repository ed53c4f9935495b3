"""The tuning face of a technique: parameters an Optuna trial samples, paper presets, a cost hook.

A technique plug-in has four faces (DESIGN.md): this search space, a runtime in `policies/` registered
under the same name, a cost hook (`predict_ms`, from the device profile) and, for lossy techniques, a
quality hook (`quality_metric`: which metric its loss shows up in). Optionally a fifth, `peers`: other
systems' implementations of the technique (e.g. Hugging Face assisted generation), benchmarked beside the
policy by `autotune bench`.

Search spaces import nothing from `tuner/` (tests/test_layering.py): what they need from the tuner (timing
inputs, calibration texts, task examples, a generation timer) comes through `SearchContext.inputs`, a
`StudyInputs` the tuner implements; what each `prepare()` measures is a typed object of the technique,
kept by the tuner in `SearchContext.prepared` under the technique's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import optuna

if TYPE_CHECKING:  # torch only for annotations: importing a search space stays cheap
    import torch

T = TypeVar("T")


class StudyInputs(Protocol):
    """The tuner's inputs a search space's `prepare()` measures with (implemented by `tuner.workload.TunerInputs`).

    A protocol rather than imports so that `search_spaces/` stays below `tuner/`: the same ids, texts and
    examples as the tuner's own (same seeds), without a search space knowing where they come from.
    """

    def timing_ids(self, tokenizer: Any, n_tokens: int, device: Any) -> torch.Tensor:
        """The ids every variant is timed on: `n_tokens` tokens of real code text, shape (1, n_tokens)."""
        ...

    def calibration_texts(self, n: int, seed: int, n_chars: int) -> list[str]:
        """`n` held-out free texts (Python standard-library code) of about `n_chars` characters."""
        ...

    def task_examples(self, task: str, n: int, seed: int) -> list[Any]:
        """`n` examples (`.prompt`, `.answer`) of the built-in task called `task`."""
        ...

    def task_prompts(self, tokenizer: Any, n: int, device: Any) -> list[tuple[torch.Tensor, int]]:
        """The first `n` examples of each task the trials are scored on, as the quality harness feeds them (ids
        of shape (1, n_tokens), chat template where the task asks for it), each with its answer's new tokens."""
        ...

    def time_generation(self, generate: Callable[..., torch.Tensor], input_ids: torch.Tensor, new_tokens: int,
                        device: Any) -> tuple[float, float]:
        """(TTFT ms, end-to-end latency ms) of `generate`, warmed up and timed once as the tuner times trials."""
        ...


@dataclass
class SearchContext:
    """What a search space may look at: the model's shape, the workload, this device's profile, and what the
    tuner (or bench) knows and measured. Only the first four are needed to build one (tests, toy techniques);
    the rest default to "not known", and each reader says what it does then."""

    model_fingerprint: dict[str, Any]
    workload: dict[str, Any]
    device: dict[str, Any]
    curves: Any = None  # pandas DataFrame from profilers.layer_profiler.profile_curves, or None
    #: The user's model spec (`builtin:tiny`, a path); None outside a study.
    model_id: str | None = None
    #: Speculative decoding's draft model spec: `--draft-model`, else the tuner's default for `model_id`
    #: (`tuner.models.default_draft_model`); None: no draft model (the model drafter is not offered).
    draft_model: str | None = None
    #: Speculative decoding's draft head (EAGLE): `--draft-head`, else the tuner's default for `model_id`
    #: (`tuner.models.default_draft_head`); None: the eagle drafter is not offered.
    draft_head: str | None = None
    #: The study's artefacts directory (profiles, caches written beside the policy); None: write nothing.
    artefacts: Path | None = None
    #: The latency the cost hooks predict: "latency_ms" or "ttft_ms" (for a tokens/s objective, latency).
    objective: str = "latency_ms"
    #: The measured dense baseline (`ttft_ms`, `latency_ms`, ...), set once measured; None before that.
    baseline: dict[str, Any] | None = None
    #: The loaded model and tokenizer, where a space needs them outside `prepare` (bench's presets).
    model: Any = None
    tokenizer: Any = None
    #: The tuner's inputs for `prepare()` (see `StudyInputs`); None where no tuner lends them.
    inputs: StudyInputs | None = None
    #: What each technique's `prepare()` returned, by technique name (set by the tuner, bench or a test).
    prepared: dict[str, object] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model_fingerprint["num_layers"])

    def prepared_state(self, name: str, cls: type[T]) -> T:
        """The `cls` object `prepare()` of technique `name` returned; a one-line error when it did not run."""
        state = self.prepared_or_none(name, cls)
        if state is None:
            raise RuntimeError(f"{name}: prepare() did not run for this context (nothing in ctx.prepared[{name!r}])")
        return state

    def prepared_or_none(self, name: str, cls: type[T]) -> T | None:
        """Like `prepared_state`, but None when `prepare()` did not run (e.g. `bench` shows presets without a
        study); a wrong type is an error either way (a typo of a technique name cannot pass silently)."""
        state = self.prepared.get(name)
        if state is not None and not isinstance(state, cls):
            raise TypeError(f"{name}: ctx.prepared[{name!r}] is a {type(state).__name__}, expected {cls.__name__}")
        return state

    def study_inputs(self) -> StudyInputs:
        """The tuner's `StudyInputs`, or a one-line error naming the missing field."""
        if self.inputs is None:
            raise RuntimeError("prepare() needs SearchContext.inputs (the tuner's StudyInputs, "
                               "tuner.workload.TunerInputs)")
        return self.inputs

    def baseline_ms(self, metric: str) -> float | None:
        """The measured dense `metric` (e.g. "ttft_ms"), or None before the baseline is measured."""
        if self.baseline is None or self.baseline.get(metric) is None:
            return None
        return float(self.baseline[metric])


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
    #: Whether the cost model reads the per-layer latency curves (`ctx.curves`); `tune` profiles them only for
    #: a study with such a technique (a 30-layer model's profile is most of a minute on a 2-core CPU).
    needs_layer_profile: bool = True

    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> object | None:
        """Measure what the cost hook needs on this device (once per study, before any trial) and return it as
        one typed object; the caller keeps it in `ctx.prepared[self.name]`, where `suggest` and `predict_ms`
        read it (`ctx.prepared_state`). Default: nothing (the per-layer curves in `ctx.curves` suffice)."""
        return None

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
