"""Block sizes and parallel decoding of masked-diffusion LMs (`policies.diffusion_blocks`), chosen by the tuner.

Parameters an Optuna trial samples (`diffusion.*`):
- `block`: block length (4 ... 64 tokens; a block longer than the generation is one block);
- `tokens_per_step`: 1, 2 or 4 tokens committed per forward on LLaDA's fixed schedule;
- `parallel`: `schedule` (that alone) or `threshold` (Fast-dLLM: also every masked position above
  `threshold` in [0.5, 0.99]; the schedule is then the floor per forward);
- `remasking`: low_confidence, random, margin or entropy;
- `adaptive`: AdaBlock's delimiter-ended blocks, with `delimiter_threshold` in [0.1, 0.9] (delimiters: the
  tokenizer's tokens that end in a newline);
- `cache`: none, prefix or dual (offered only when the model supports the block cache).

Presets (enqueued first): LLaDA (block 32, one token per forward, no cache: the `dense` row), Fast-dLLM
(threshold 0.9, block 32, prefix cache) and AdaBlock (delimiter threshold 0.3, default block 32, on top of
Fast-dLLM's threshold decoding and cache, as the paper evaluates it).

Cost hook: the workload's latency = per block, one full forward over prompt + canvas, then (forwards - 1)
forwards that are full (no cache) or windowed (prefix: the block and all after it; dual: the block), each
forward's latency measured on this device by `search_spaces.diffusion_blocks_profiler`, plus the loop's own per-forward
cost (calibrated from one real decode).  Forwards per block are exact for fixed schedules; for threshold
decoding they are measured in `prepare` on the workload's prompt for each block length at a grid of
thresholds, and interpolated.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from policies.diffusion_blocks import (
    NAME,
    REMASKING_RULES,
    DiffusionConfig,
    DiffusionStats,
    diffusion_generate,
    supports_block_cache,
)
from profilers.timing import synchronize
from search_spaces import register_search_space
from search_spaces.base import Preset, SearchContext, SearchSpace

BLOCKS = (4, 8, 16, 32, 64)
TOKENS_PER_STEP = (1, 2, 4)
THRESHOLD_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
PRESET_BLOCK = 32


def newline_ids(tokenizer: Any) -> list[int]:
    """AdaBlock's delimiters for this tokenizer: every token whose text ends in a newline."""
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.endswith("\n") and token_id not in tokenizer.all_special_ids:
            ids.append(token_id)
    return ids


def section(ctx: SearchContext, block: int, *, tokens_per_step: int = 1, threshold: float | None = None,
            remasking: str = "low_confidence", delimiter_threshold: float | None = None,
            cache: str = "none") -> dict[str, Any]:
    """A `diffusion_blocks` section: `tokens_per_step` sets LLaDA's fixed schedule (with a threshold, the
    minimum per forward: one token is `steps_per_block: null`)."""
    steps = max(1, math.ceil(block / tokens_per_step))
    doc: dict[str, Any] = {"block_length": block, "remasking": remasking, "cache": cache,
                           "steps_per_block": None if threshold is not None and tokens_per_step == 1 else steps,
                           "threshold": None if threshold is None else float(threshold)}
    if delimiter_threshold is not None:
        doc["delimiter_threshold"] = float(delimiter_threshold)
        doc["delimiter_ids"] = delimiters(ctx)
    return doc




@dataclass
class DiffusionCalibration:
    """What this space knows about the model on this device (`ctx.prepared["diffusion_blocks"]`).

    The model facts (AdaBlock's delimiters, block-cache support) are probed once, by `prepare` or, where no
    study prepared the context (`bench` shows presets), on first use from `ctx.model` / `ctx.tokenizer`; the
    measurements only `prepare` makes are None until then (no cost model)."""

    delimiter_ids: list[int] | None  # the tokenizer's newline-ended tokens; None: no tokenizer to probe
    cache_supported: bool  # the model supports the block KV cache (`supports_block_cache`)
    #: {"full": rows, "window": rows} forward latencies (`diffusion_blocks_profiler.profile_denoiser`)
    profile: dict[str, Any] | None = None
    #: {str(block): forwards per generated token at each THRESHOLD_GRID value}, measured on the workload's prompt
    threshold_forwards: dict[str, list[float]] | None = None
    loop_ms: float = 0.0  # the decode loop's own milliseconds per forward (0 until measured)

    @classmethod
    def probe(cls, model: Any, tokenizer: Any) -> DiffusionCalibration:
        """The model facts, without measurements (no model: no block cache; no tokenizer: no delimiters)."""
        return cls(delimiter_ids=None if tokenizer is None else newline_ids(tokenizer),
                   cache_supported=model is not None and supports_block_cache(model))


def _state(ctx: SearchContext) -> DiffusionCalibration:
    """The context's `DiffusionCalibration`; probed from `ctx.model` / `ctx.tokenizer` and kept under the
    technique's name when `prepare` did not run."""
    state = ctx.prepared_or_none(NAME, DiffusionCalibration)
    if state is None:
        state = DiffusionCalibration.probe(ctx.model, ctx.tokenizer)
        ctx.prepared[NAME] = state
    return state


def delimiters(ctx: SearchContext) -> list[int]:
    """AdaBlock's delimiters for the context's tokenizer, probed once per context."""
    ids = _state(ctx).delimiter_ids
    if ids is None:
        raise ValueError("diffusion_blocks needs the tokenizer (SearchContext.tokenizer) to find AdaBlock's delimiters")
    return list(ids)


def cache_supported(ctx: SearchContext) -> bool:
    """Whether the context's model supports the block KV cache; probed once per context."""
    return _state(ctx).cache_supported


class DiffusionBlocksSpace(SearchSpace):
    name = NAME
    quality_metric = "accuracy"

    # ------------------------------------------------------------------------------------------ prepare
    def prepare(self, ctx: SearchContext, model: Any, tokenizer: Any, device: Any) -> DiffusionCalibration:
        """Delimiters, cache support, the two forward-latency curves, forwards per block under thresholds,
        and the loop's own cost per forward."""
        from search_spaces.diffusion_blocks_profiler import profile_denoiser

        inputs = ctx.study_inputs()
        state = DiffusionCalibration.probe(model, tokenizer)
        cache_ok = state.cache_supported
        prompt, new = int(ctx.workload["prompt_tokens"]), int(ctx.workload["new_tokens"])
        total = prompt + new
        state.profile = profile_denoiser(
            model, device, seq_lens=(total,), kv_tokens=prompt,
            windows=sorted({2, 4, 8, 16, 32, 64, new + 1, min(new + 1, 65)}), cache=cache_ok)
        input_ids = inputs.timing_ids(tokenizer, prompt, device)
        state.threshold_forwards = self._threshold_forwards(model, input_ids, new, cache_ok)
        state.loop_ms = self._loop_overhead(ctx, state, model, input_ids, new, cache_ok)
        return state

    @staticmethod
    def _threshold_forwards(model: Any, input_ids: torch.Tensor, new: int, cache_ok: bool) -> dict[str, Any]:
        """{block: [forwards per generated token at each THRESHOLD_GRID value]} on the workload's prompt."""
        table: dict[str, Any] = {}
        for block in BLOCKS:
            row = []
            for threshold in THRESHOLD_GRID:
                cfg = DiffusionConfig(block_length=block, steps_per_block=None, threshold=threshold,
                                      cache="prefix" if cache_ok else "none")
                stats = DiffusionStats()
                diffusion_generate(model, input_ids, new, cfg, stats=stats)
                row.append(stats.forwards / new)
            table[str(block)] = row
        return table

    def _loop_overhead(self, ctx: SearchContext, state: DiffusionCalibration, model: Any, input_ids: torch.Tensor,
                       new: int, cache_ok: bool) -> float:
        """The loop's own milliseconds per forward (softmax, selection, copies): one real decode of a
        threshold configuration, minus its forwards' profiled latency, per forward (median of 3, >= 0)."""
        cfg = DiffusionConfig(block_length=PRESET_BLOCK, steps_per_block=None, threshold=0.9,
                              cache="prefix" if cache_ok else "none")
        device = input_ids.device
        residuals = []
        for _ in range(3):
            stats = DiffusionStats()
            synchronize(device)
            start = time.perf_counter()
            diffusion_generate(model, input_ids, new, cfg, stats=stats)
            synchronize(device)
            elapsed = (time.perf_counter() - start) * 1e3
            forward_ms = self._forwards_ms(ctx, state, cfg, stats.block_forwards, new)
            residuals.append((elapsed - forward_ms) / max(stats.forwards, 1))
        return max(0.0, statistics.median(residuals))

    # ---------------------------------------------------------------------------------------- suggest
    def suggest(self, trial: optuna.Trial, ctx: SearchContext) -> dict[str, Any]:
        block = trial.suggest_categorical("diffusion.block", list(BLOCKS))
        tokens_per_step = trial.suggest_categorical("diffusion.tokens_per_step", list(TOKENS_PER_STEP))
        threshold = None
        if trial.suggest_categorical("diffusion.parallel", ["schedule", "threshold"]) == "threshold":
            threshold = trial.suggest_float("diffusion.threshold", 0.5, 0.99)
        remasking = trial.suggest_categorical("diffusion.remasking", list(REMASKING_RULES))
        delimiter = None
        if trial.suggest_categorical("diffusion.adaptive", [False, True]):
            delimiter = trial.suggest_float("diffusion.delimiter_threshold", 0.1, 0.9)
        caches = ["none", "prefix", "dual"] if cache_supported(ctx) else ["none"]
        cache = trial.suggest_categorical("diffusion.cache", caches)
        return section(ctx, block, tokens_per_step=tokens_per_step, threshold=threshold, remasking=remasking,
                       delimiter_threshold=delimiter, cache=cache)

    def presets(self, ctx: SearchContext) -> list[Preset]:
        cache = "prefix" if cache_supported(ctx) else "none"
        base = {"diffusion.block": PRESET_BLOCK, "diffusion.tokens_per_step": 1,
                "diffusion.remasking": "low_confidence", "diffusion.adaptive": False}
        llada = dict(base, **{"diffusion.parallel": "schedule", "diffusion.cache": "none"})
        fast = dict(base, **{"diffusion.parallel": "threshold", "diffusion.threshold": 0.9, "diffusion.cache": cache})
        ada = dict(fast, **{"diffusion.adaptive": True, "diffusion.delimiter_threshold": 0.3})
        return [
            Preset("llada", llada, section(ctx, PRESET_BLOCK),
                   "LLaDA (Nie et al. 2025): block 32, one token per forward, low-confidence remasking"),
            Preset("fast-dllm", fast, section(ctx, PRESET_BLOCK, threshold=0.9, cache=cache),
                   "Fast-dLLM (Wu et al. 2025): confidence threshold 0.9, block 32, prefix KV cache"),
            Preset("adablock", ada, section(ctx, PRESET_BLOCK, threshold=0.9, delimiter_threshold=0.3, cache=cache),
                   "AdaBlock-dLLM (2025): newline-ended blocks at delimiter confidence 0.3, default block 32, "
                   "on Fast-dLLM's threshold decoding"),
        ]

    # ------------------------------------------------------------------------------------------- cost
    def forwards_per_block(self, ctx: SearchContext, cfg: DiffusionConfig, length: int) -> float:
        """Predicted forwards for a block of `length` tokens: exact for a fixed schedule; with a threshold, the
        measured forwards per token of the nearest block length, interpolated in the threshold (and never
        more than the schedule's floor allows)."""
        steps = float(min(cfg.steps_for(length), length))
        if cfg.threshold is None:
            return steps
        table = _state(ctx).threshold_forwards
        if not table:
            return steps
        block = min(BLOCKS, key=lambda b: abs(b - cfg.block_length))
        row = table[str(block)]
        t = min(max(cfg.threshold, THRESHOLD_GRID[0]), THRESHOLD_GRID[-1])
        points = list(zip(THRESHOLD_GRID, row, strict=True))
        per_token = points[-1][1]
        for (t0, f0), (t1, f1) in zip(points, points[1:], strict=False):
            if t <= t1:
                per_token = f0 + (f1 - f0) * (t - t0) / (t1 - t0)
                break
        return max(1.0, min(steps, per_token * length))

    def _forwards_ms(self, ctx: SearchContext, state: DiffusionCalibration, cfg: DiffusionConfig,
                     forwards: list[float], new: int) -> float:
        """Forward latency of a decode with `forwards[i]` forwards in block i (blocks of cfg.block_length)."""
        from search_spaces.speculative_profiler import VerifyCurve

        profile = state.profile
        if profile is None:
            raise RuntimeError("diffusion_blocks: prepare() did not run (no forward-latency profile)")
        prompt = int(ctx.workload["prompt_tokens"])
        full = VerifyCurve(profile["full"]).ms(prompt + new, 0)
        window = VerifyCurve(profile["window"]) if profile.get("window") else None
        total_ms, start = 0.0, 0
        for n_forwards in forwards:
            length = min(cfg.block_length, new - start)
            if cfg.cache == "none" or window is None:
                step = full
            else:
                q = (new - start if cfg.cache == "prefix" else length) + 1
                step = window.ms(q, prompt)
            total_ms += full + max(0.0, n_forwards - 1) * step
            start += length
        return total_ms

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        """Predicted end-to-end latency (ms) of generating the workload's tokens under `section`."""
        state = ctx.prepared_or_none(self.name, DiffusionCalibration)
        if state is None or state.profile is None:
            return None
        cfg = DiffusionConfig.from_section(section)
        new = int(ctx.workload["new_tokens"])
        lengths = [min(cfg.block_length, new - s) for s in range(0, new, cfg.block_length)]
        forwards = [self.forwards_per_block(ctx, cfg, n) for n in lengths]
        loop = state.loop_ms * sum(forwards)
        return self._forwards_ms(ctx, state, cfg, forwards, new) + loop


register_search_space(DiffusionBlocksSpace())
