"""Ranking screen: which scorer, window and pool keep the prompt rows that the dense model's answer reads.

Why: a schedule says how many rows a layer keeps, the ranking (scorer, observation window, pooling kernel)
which ones, and the wrong ranking loses an answer at any schedule. On SmolLM2-135M at 2k-token passkey prompts
only pooled window attention kept the key (benchmarks/RESULTS.md): one ranking in a few, which a study of 12
trials, most of them stopped at their first wrong answer, does not find by sampling.

How: SnapKV (arXiv 2404.14469) observed that the attention of a prompt's last rows predicts which rows the
generated tokens will attend to, and measured it as a hit rate. The screen measures that prediction for every
candidate ranking on this model and on the trials' own first examples:

1. the dense model answers each example greedily;
2. one eager forward over prompt + answer records, at every layer, the attention of the answer's rows over the
   prompt (what the answer read: each row's importance), the attention of the prompt's last `w` rows for every
   window `w` (what the runtime ranks by) and the residual norms (the `l2norm` scorer). Causal attention makes
   the prompt rows' values exactly those of a prompt-only prefill;
3. for each candidate, the droppable rows kept at keep fraction `SCREEN_KEEP` (the runtime's own pooling and
   selection), and of the m most important droppable rows (m = the answer's length: the rows its tokens were
   read from) the share kept: the hit rate, averaged over the layers from a quarter of the depth on (where
   schedules drop) and over the examples. Not the share of importance *mass* kept: a small model's answer
   reads one or two digits of a key heavily and the rest lightly, so mass recall ranked unpooled scores first
   on SmolLM2 (0.86 vs 0.81 for kernel 15), the ranking that lost every passkey; the hit rate ranks kernel 15
   first (0.98 vs 0.91 unpooled, window 32).

The search space starts the study with the paper schedules ranked the screen's best way (`presets`), so the
sampler has fast, feasible trials to learn from; every ranking stays in the space.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from policies.token_retention import DEFAULTS, droppable_mask, pool_scores, select_kept
from profilers.model_parts import decoder_parts

#: Keep fraction at which candidates are compared: about what a 2x-faster prefill keeps past the first layers.
SCREEN_KEEP = 0.25
SCREEN_EXAMPLES = 2


@dataclass(frozen=True)
class Ranking:
    scorer: str
    window: int
    pool: int

    @property
    def key(self) -> str:
        return f"{self.scorer}/w{self.window}/p{self.pool}"


@dataclass
class RankingScreen:
    """Mean hit rate of the answer's most-read rows per candidate ranking (`Ranking.key`), and the examples used."""

    hit_rate: dict[str, float] = field(default_factory=dict)
    n_examples: int = 0
    keep: float = SCREEN_KEEP

    def best(self, candidates: list[Ranking]) -> Ranking:
        """The candidate with the highest recall; ties go to the earlier candidate (smaller windows and pools)."""
        return max(candidates, key=lambda c: (self.hit_rate.get(c.key, -1.0), -candidates.index(c)))


def candidates(scorers: tuple[str, ...], windows: tuple[int, ...], pools: tuple[int, ...]) -> list[Ranking]:
    return [Ranking(s, w, p) for s, w, p in itertools.product(scorers, windows, pools)]


class _Recorder:
    """Forward hooks that reduce each layer's attention matrix to the rows the screen needs, as it is made
    (a full matrix per layer at 2k tokens would be 150 MB each)."""

    def __init__(self, model: Any, n_prompt: int, windows: tuple[int, ...]) -> None:
        self.n_prompt, self.windows = n_prompt, windows
        self.importance: dict[int, torch.Tensor] = {}
        self.window_scores: dict[tuple[int, int], torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(decoder_parts(model).layers):
            self._handles.append(layer.self_attn.register_forward_hook(self._attention_hook(i)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(i)))

    def _attention_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("ranking screen: the attention returned no weights (needs eager attention)")
            p = self.n_prompt
            probs = weights[0].float()  # (heads, rows, keys)
            self.importance[layer] = probs[:, p:, :p].mean(dim=(0, 1))
            for w in self.windows:
                self.window_scores[(layer, w)] = probs[:, p - w:p, :p].mean(dim=(0, 1))
            return (output[0], None, *output[2:])

        return hook

    def _layer_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self.norms[layer] = hidden[0, :self.n_prompt].float().norm(dim=-1)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _eager(model: Any) -> Any:
    """Switch `model` to eager attention (which returns its weights); returns the implementation to restore."""
    original = model.config._attn_implementation
    if original != "eager":
        model.set_attn_implementation("eager")
    return original


def screen_rankings(model: Any, prompts: list[tuple[torch.Tensor, int]], cands: list[Ranking],
                    keep: float = SCREEN_KEEP, sinks: int = DEFAULTS["sinks"]) -> RankingScreen:
    """Recall of the answer's attention for every candidate (see the module docstring). `prompts`: (prompt ids
    of shape (1, n), new tokens the task answers with)."""
    windows = tuple(sorted({c.window for c in cands}))
    per_candidate: dict[str, list[float]] = {c.key: [] for c in cands}
    n_layers = model.config.num_hidden_layers
    layers = range(max(1, n_layers // 4), n_layers - 1)  # layer L's scores choose layer L+1's rows
    used = 0
    for ids, new_tokens in prompts:
        n_prompt = ids.shape[1]
        if n_prompt <= sinks + max(windows) + 1:
            continue  # nothing droppable for some candidate
        with torch.inference_mode():
            full = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                  attention_mask=torch.ones_like(ids))
        if full.shape[1] <= n_prompt:
            continue
        original = _eager(model)
        recorder = _Recorder(model, n_prompt, windows)
        try:
            with torch.inference_mode():
                model(full, use_cache=False, logits_to_keep=1)
        finally:
            recorder.remove()
            if original != "eager":
                model.set_attn_implementation(original)
        used += 1
        slots = torch.arange(n_prompt)
        n_keep = max(1, round(keep * n_prompt))
        n_read = full.shape[1] - n_prompt
        for c in cands:
            droppable = droppable_mask(slots, n_prompt, sinks, c.window, None)
            hits = []
            for layer in layers:
                importance = torch.where(droppable, recorder.importance[layer], -1.0)
                most_read = importance.topk(min(n_read, int(droppable.sum()))).indices
                scores = recorder.window_scores[(layer, c.window)] if c.scorer == "attention" else recorder.norms[layer]
                kept = torch.zeros(n_prompt, dtype=torch.bool)
                kept[select_kept(pool_scores(scores, droppable, c.pool), droppable, n_keep)] = True
                hits.append(float(kept[most_read].float().mean()))
            per_candidate[c.key].append(statistics.fmean(hits))
    hit_rate = {key: round(statistics.fmean(v), 4) for key, v in per_candidate.items() if v}
    return RankingScreen(hit_rate=hit_rate, n_examples=used, keep=keep)
