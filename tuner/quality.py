"""Quality harness: how far a tuned model's outputs move from the dense model's.

Three metrics, all reported in points (0-100) or nats so that a quality budget reads naturally:
- `accuracy`: exact-match accuracy on the built-in tasks (greedy generation), averaged over tasks;
- `top1_agreement`: teacher-forced next-token argmax agreement with dense on free text (code);
- `mean_kl`: mean KL(dense || tuned) per position on the same free text (nats).

The dense reference (its task answers, argmaxes and log-probabilities) is computed once per study and
cached on disk as safetensors + JSON (never pickles), keyed by the model fingerprint and the evaluation
settings, so every trial only runs the tuned model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from policies.model_kind import model_kind
from policies.runtime import apply_policy
from tuner.tasks import code_samples, get_task, prompt_ids

QUALITY_METRICS = ("accuracy", "top1_agreement", "mean_kl")
# Metrics where larger is better; mean_kl is the only one where smaller is better.
HIGHER_IS_BETTER = {"accuracy": True, "top1_agreement": True, "mean_kl": False}
# Prefixes scored per free-text sample when a variant returns logits for fewer rows than it was given.
PREFIX_POINTS = 8


@dataclass(frozen=True)
class QualityConfig:
    """What to evaluate: which tasks, how many examples, how much free text."""

    tasks: tuple[str, ...] = ("needle", "pattern")
    examples_per_task: int = 20
    free_text_samples: int = 4
    free_text_chars: int = 1200
    seed: int = 1234

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class QualityReport:
    """Quality of one model variant, with per-task detail."""

    accuracy: float
    task_accuracy: dict[str, float]
    top1_agreement: float | None = None
    mean_kl: float | None = None
    n_examples: int = 0
    predictions: dict[str, list[str]] = field(default_factory=dict)
    #: Set when evaluation stopped early (``evaluate(..., stop_below=...)``): even with every remaining example
    #: right, accuracy could not reach the floor. ``accuracy`` is then that upper bound, not a measurement.
    stopped_early: bool = False
    #: For a stopped report: the accuracy its scored examples suggest, by Laplace's rule of succession
    #: (100 * (right + 1) / (scored + 2), pooled over the tasks scored so far). A variant that missed its first
    #: example and one that missed its fifteenth share the bound above; this tells them apart for the sampler.
    estimated_accuracy: float | None = None

    def metric(self, name: str) -> float:
        value = getattr(self, name, None)
        if name not in QUALITY_METRICS:
            raise ValueError(f"quality metric {name!r} is unknown; choose one of {', '.join(QUALITY_METRICS)}")
        if value is None:
            raise ValueError(f"quality metric {name!r} unavailable here (a masked-diffusion model is scored on "
                             "accuracy only)")
        return float(value)

    def summary(self) -> dict[str, Any]:
        out = {"accuracy": self.accuracy, "task_accuracy": dict(self.task_accuracy),
               "top1_agreement": self.top1_agreement, "mean_kl": self.mean_kl, "n_examples": self.n_examples}
        if self.estimated_accuracy is not None:
            out["estimated_accuracy"] = self.estimated_accuracy
        return out


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a success rate, in points: the interval accuracy claims
    quote. It stays inside [0, 100] and is not degenerate at 0% or 100%, unlike the normal approximation."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one example, got n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def quality_drop(metric: str, reference: float, candidate: float) -> float:
    """How much worse `candidate` is than `reference` for `metric` (>= 0 means worse)."""
    return reference - candidate if HIGHER_IS_BETTER[metric] else candidate - reference


GenerateFn = Callable[..., torch.Tensor]


def _greedy_answers(generate: GenerateFn, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                    device: torch.device, chat: bool = False) -> list[str]:
    answers = []
    for prompt in prompts:
        input_ids = prompt_ids(tokenizer, prompt, chat=chat).to(device)
        out = generate(input_ids, max_new_tokens=max_new_tokens)
        answers.append(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
    return answers


def _free_text_ids(tokenizer: Any, config: QualityConfig) -> list[torch.Tensor]:
    texts = code_samples(config.free_text_samples, seed=config.seed, n_chars=config.free_text_chars)
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]


class QualityHarness:
    """Evaluates model variants against a dense reference computed once, when the harness is built (the
    model must be dense then).

    `reference` returns the dense model's quality; `evaluate` runs any variant given as a `generate` callable (a
    policy handle's generate) and a `forward` callable (teacher-forced logits).
    """

    def __init__(self, model: Any, tokenizer: Any, config: QualityConfig | None = None,
                 cache_dir: Path | None = None, model_key: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or QualityConfig()
        self.device = next(model.parameters()).device
        self.cache_dir = cache_dir
        self.model_key = model_key
        self._examples = {t: get_task(t).examples(self.config.examples_per_task, seed=self.config.seed)
                          for t in self.config.tasks}
        # Teacher-forced next-token metrics (agreement, KL) describe causal LMs; a masked-diffusion model's
        # policies change only its decode loop, so it is scored on task accuracy alone.
        diffusion = model_kind(model) == "masked-diffusion"
        self._free_text = _free_text_ids(tokenizer, self.config) if self.config.free_text_samples and not diffusion \
            else []
        self._reference: QualityReport | None = None
        self._ref_logprobs: list[torch.Tensor] = []
        # Computed now, while the model is certainly dense: a lazily computed reference could be taken
        # with a policy applied and would then silently score every variant against itself.
        self.reference()

    # -- dense reference -------------------------------------------------------------------------
    def _cache_paths(self) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        stem = f"dense-reference-{hashlib.sha256(self.model_key.encode()).hexdigest()[:12]}-{self.config.key()}"
        return self.cache_dir / f"{stem}.json", self.cache_dir / f"{stem}.safetensors"

    def reference(self) -> QualityReport:
        """The dense model's quality; computed once, then served from memory or the disk cache."""
        if self._reference is not None:
            return self._reference
        paths = self._cache_paths()
        if paths and paths[0].is_file() and paths[1].is_file():
            self._load_reference(*paths)
            return self._reference  # type: ignore[return-value]
        with torch.inference_mode():
            self._ref_logprobs = [torch.log_softmax(self.model(ids.to(self.device)).logits[0].float(), -1).cpu()
                                  for ids in self._free_text]
        report = self._score_tasks(self._dense_generate)
        report.top1_agreement = 100.0 if self._free_text else None
        report.mean_kl = 0.0 if self._free_text else None
        self._reference = report
        if paths:
            self._save_reference(*paths)
        return report

    def _dense_generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        # the dense policy handle: `model.generate` for a causal LM, the baseline loop for a diffusion model
        return apply_policy(self.model, None).generate(
            input_ids, max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(input_ids),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)

    def _save_reference(self, json_path: Path, tensor_path: Path) -> None:
        from safetensors.torch import save_file

        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_t = tensor_path.with_suffix(".tmp")
        save_file({f"logprobs_{i}": lp.contiguous() for i, lp in enumerate(self._ref_logprobs)}, str(tmp_t))
        os.replace(tmp_t, tensor_path)
        tmp_j = json_path.with_suffix(".tmp")
        tmp_j.write_text(json.dumps({"report": self._reference.summary(),  # type: ignore[union-attr]
                                     "predictions": self._reference.predictions}))  # type: ignore[union-attr]
        os.replace(tmp_j, json_path)

    def _load_reference(self, json_path: Path, tensor_path: Path) -> None:
        from safetensors.torch import load_file

        data = json.loads(json_path.read_text())
        tensors = load_file(str(tensor_path))
        self._ref_logprobs = [tensors[f"logprobs_{i}"] for i in range(len(tensors))]
        summary = data["report"]
        self._reference = QualityReport(accuracy=summary["accuracy"], task_accuracy=summary["task_accuracy"],
                                        top1_agreement=summary["top1_agreement"], mean_kl=summary["mean_kl"],
                                        n_examples=summary["n_examples"], predictions=data["predictions"])

    # -- variants --------------------------------------------------------------------------------
    def _score_tasks(self, generate: GenerateFn, stop_below: float | None = None) -> QualityReport:
        """Task accuracy (mean over tasks, in points). With ``stop_below``, stop as soon as the best accuracy
        still possible (every remaining example right) is below it: an exact bound, so a stopped variant could
        never have reached the floor, and nothing that could is stopped."""
        scores: dict[str, list[float]] = {name: [] for name in self._examples}
        predictions: dict[str, list[str]] = {name: [] for name in self._examples}
        stopped = False
        with torch.inference_mode():
            for name, examples in self._examples.items():
                task = get_task(name)
                for example in examples:
                    pred = _greedy_answers(generate, self.tokenizer, [example.prompt], task.max_new_tokens,
                                           self.device, chat=task.chat)[0]
                    scores[name].append(task.score(pred, example.answer))
                    predictions[name].append(pred)
                    if stop_below is not None and self._best_possible(scores) < stop_below:
                        stopped = True
                        break
                if stopped:
                    break
        task_accuracy = {name: self._task_bound(name, s) if stopped else 100.0 * sum(s) / max(len(s), 1)
                         for name, s in scores.items()}
        accuracy = sum(task_accuracy.values()) / max(len(task_accuracy), 1)
        scored = [x for s in scores.values() for x in s]
        estimate = 100.0 * (sum(scored) + 1) / (len(scored) + 2) if stopped else None
        return QualityReport(accuracy=accuracy, task_accuracy=task_accuracy, n_examples=len(scored),
                             predictions=predictions, stopped_early=stopped, estimated_accuracy=estimate)

    def _task_bound(self, name: str, scores: list[float]) -> float:
        """A task's accuracy (points) if every one of its examples not yet scored were right."""
        n = len(self._examples[name])
        return 100.0 * (sum(scores) + n - len(scores)) / max(n, 1)

    def _best_possible(self, scores: dict[str, list[float]]) -> float:
        """Mean task accuracy (points) if every example not yet scored were right."""
        bounds = [self._task_bound(name, s) for name, s in scores.items()]
        return sum(bounds) / max(len(bounds), 1)

    def evaluate(self, generate: GenerateFn, forward: Callable[[torch.Tensor], Any] | None = None,
                 stop_below: float | None = None) -> QualityReport:
        """Score a variant: task accuracy through `generate`, agreement/KL through `forward` (if given).

        ``stop_below`` (accuracy points): stop scoring tasks once accuracy provably cannot reach it (the report
        says ``stopped_early``; agreement and KL are then not computed)."""
        self.reference()
        report = self._score_tasks(generate, stop_below)
        if forward is not None and self._free_text and not report.stopped_early:
            agree, total, kl_sum = 0, 0, 0.0
            with torch.inference_mode():
                for ids, ref_lp in zip(self._free_text, self._ref_logprobs, strict=True):
                    lp, ref = self._variant_logprobs(forward, ids, ref_lp)
                    agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
                    total += lp.shape[0]
                    kl_sum += float((ref.exp() * (ref - lp)).sum())
            report.top1_agreement = 100.0 * agree / max(total, 1)
            report.mean_kl = kl_sum / max(total, 1)
        return report

    def _variant_logprobs(self, forward: Callable[[torch.Tensor], Any], ids: torch.Tensor,
                          ref_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs of a variant and the matching dense rows.

        A technique that drops prompt rows (token retention) returns logits for fewer positions than it was
        given; only the last position is guaranteed to be there, and it is the one generation uses. Then the
        text is scored at the last position of `PREFIX_POINTS` prefixes (the dense row for a prefix ending at
        position p is row p of the full causal forward).
        """
        logits = forward(ids.to(self.device)).logits[0].float().cpu()
        if logits.shape[0] == ids.shape[1]:
            return torch.log_softmax(logits, -1), ref_lp
        n = ids.shape[1]
        ends = sorted({max(1, round(n * (0.5 + 0.5 * i / (PREFIX_POINTS - 1)))) for i in range(PREFIX_POINTS)})
        rows = [forward(ids[:, :end].to(self.device)).logits[0, -1].float().cpu() for end in ends]
        return torch.log_softmax(torch.stack(rows), -1), ref_lp[[end - 1 for end in ends]]

