"""The workload a policy is tuned for, and the token ids used to time it.

Timing inputs are real text (held-out Python standard-library code from the built-in tasks' free-text
source) cut to exactly `prompt_tokens`, so content-dependent techniques (token importance, n-gram drafts)
see realistic input while every variant is timed on identical ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tuner.measure import measure_generation
from tuner.tasks import code_samples, get_task, prompt_ids


@dataclass(frozen=True)
class Workload:
    batch_size: int = 1
    prompt_tokens: int = 1024
    new_tokens: int = 32
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.batch_size != 1:
            raise ValueError(f"batch size {self.batch_size}: only batch 1 is supported so far")
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens must be >= 1, got {self.prompt_tokens}")
        if self.new_tokens < 1:
            raise ValueError(f"--new-tokens must be >= 1, got {self.new_tokens}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_policy(cls, policy: Any) -> Workload:
        """The workload a policy was tuned for (`policy.workload`)."""
        w = policy.workload
        return cls(batch_size=w.batch_size, prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens, dtype=w.dtype)


def timing_input_ids(tokenizer: Any, prompt_tokens: int, device: torch.device, seed: int = 7) -> torch.Tensor:
    """`prompt_tokens` ids of real code text, shape (1, prompt_tokens)."""
    ids: list[int] = []
    n_chars = max(4 * prompt_tokens, 2000)
    attempt = 0
    while len(ids) < prompt_tokens:
        for text in code_samples(4, seed=seed + attempt, n_chars=n_chars):
            ids.extend(tokenizer(text).input_ids)
        attempt += 1
        if attempt > 50:
            raise RuntimeError("could not assemble enough timing text")
    return torch.tensor([ids[:prompt_tokens]], dtype=torch.long, device=device)


class TunerInputs:
    """The tuner's `search_spaces.StudyInputs`: what a search space's `prepare()` measures with, handed to it
    through `SearchContext.inputs` (search spaces never import the tuner). The same ids, texts, examples and
    timing as the tuner's own, so a calibration sees exactly what the trials see."""

    def timing_ids(self, tokenizer: Any, n_tokens: int, device: Any) -> torch.Tensor:
        return timing_input_ids(tokenizer, n_tokens, device)

    def calibration_texts(self, n: int, seed: int, n_chars: int) -> list[str]:
        return code_samples(n, seed=seed, n_chars=n_chars)

    def __init__(self, quality: Any = None) -> None:
        self.quality = quality  # the study's QualityConfig: which tasks and seed the trials are scored on

    def task_examples(self, task: str, n: int, seed: int) -> list[Any]:
        return get_task(task).examples(n, seed=seed)

    def task_prompts(self, tokenizer: Any, n: int, device: Any) -> list[tuple[torch.Tensor, int]]:
        if self.quality is None:
            return []
        out = []
        for name in self.quality.tasks:
            task = get_task(name)
            for example in task.examples(self.quality.examples_per_task, seed=self.quality.seed)[:n]:
                out.append((prompt_ids(tokenizer, example.prompt, chat=task.chat).to(device), task.max_new_tokens))
        return out

    def time_generation(self, generate: Callable[..., torch.Tensor], input_ids: torch.Tensor, new_tokens: int,
                        device: Any) -> tuple[float, float]:
        """One warm-up of both call shapes, then one TTFT and one full call (no memory reading)."""
        m = measure_generation(generate, input_ids, new_tokens, device, repeats=1, peak_memory=False)
        return m.ttft_ms, m.latency_ms
