"""Decoding masked-diffusion language models: semi-autoregressive blocks, remasking rules, parallel decoding.

A masked-diffusion LM (LLaDA, Dream, or any Hugging Face masked LM used as a denoiser) generates by
appending ``max_new_tokens`` mask tokens to the prompt and filling them in over several forwards: each
forward predicts every masked position at once, and the loop *commits* some of the predictions (the rest
stay masked for the next forward).  How many forwards a token costs is the speed knob this module exposes:

- **Blocks** (LLaDA's semi-autoregressive decoding): the masks are filled block by block, left to right;
  within a block, ``steps_per_block`` steps commit tokens on LLaDA's linear schedule (the block's masks
  split evenly over the steps, the first steps taking the remainder; a shorter last block, or an adaptive
  one, gets proportionally fewer or more steps).  ``steps_per_block ==
  block_length`` is one token per forward: the baseline (and the ``dense`` row of ``autotune bench``).
- **Remasking rule**: which predictions a step commits first: ``low_confidence`` (highest top-1
  probability, LLaDA), ``random`` (LLaDA), ``margin`` (top-1 minus top-2 probability, Dream's
  ``topk_margin``) or ``entropy`` (lowest predictive entropy, Dream).
- **Confidence threshold** (Fast-dLLM): a step also commits every masked position of the block whose
  top-1 probability is *strictly above* ``threshold`` -- at least the schedule's count (one when
  ``steps_per_block`` is null), so every forward commits a token and the loop always terminates.
- **Adaptive block ends** (AdaBlock-dLLM): at a block's first forward, the block ends right after the first
  position within ``max_block_length`` predicted to be a delimiter (e.g. a newline) with probability at least
  ``delimiter_threshold``; with no such position it keeps its default length.
- **Approximate KV cache** (Fast-dLLM): the block's first forward runs over the whole sequence and keeps
  every layer's keys and values; the block's later forwards recompute only a window (``prefix``: the block
  and everything after it; ``dual``: the block alone) and attend to the kept keys/values of the rest.
  Approximate because, with bidirectional attention, the kept positions would have seen the block's newly
  committed tokens.  Only models whose attention layers take a cache and ``position_ids``
  through ``forward`` support it (Llama-layout encoders such as EuroBERT / ``builtin:tiny-mdm``); this is
  probed, exactly, when a policy asking for it is applied.

Models with *shifted* logits (Dream: the logits at position i predict token i + 1; marked by
``config.logits_shift`` or Dream's model type) are handled by reading each position's prediction from the
position before it (and, with a cache, recomputing that one extra position).

The section (``techniques.diffusion_blocks``)::

    block_length: 32            # tokens per block (the last block may be shorter)
    steps_per_block: 32         # forwards per block on the linear schedule; null with a threshold: >= 1 per step
    threshold: 0.9              # Fast-dLLM: also commit every masked position with top-1 probability > this
    remasking: low_confidence   # low_confidence | random | margin | entropy
    delimiter_threshold: 0.3    # AdaBlock (null: fixed blocks)
    delimiter_ids: [10, 201]    # token ids that end a block (required with delimiter_threshold)
    max_block_length: 64        # AdaBlock's search window (default: 2 x block_length)
    cache: none                 # none | prefix | dual
    seed: 0                     # for random remasking and sampling
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from policies.config import Choice, Int, ListOf, Nullable, Number, TechniqueConfig, option
from policies.model_kind import DIFFUSION_MODEL_TYPES, MASKED_DIFFUSION
from policies.registry import DecodeStats, TechniqueHandle, TechniqueRuntime, register_runtime
from policies.schema import PolicyError
from profilers.hf_compat import cache_arg

__all__ = [
    "CACHE_MODES",
    "REMASKING_RULES",
    "DiffusionConfig",
    "DiffusionStats",
    "Denoiser",
    "baseline_config",
    "baseline_handle",
    "denoiser_for",
    "diffusion_generate",
    "supports_block_cache",
    "transfer_schedule",
]

NAME = "diffusion_blocks"
REMASKING_RULES = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
#: The baseline block length (LLaDA's demo setting): the ``dense`` row of a diffusion model.
BASELINE_BLOCK = 32


# ------------------------------------------------------------------------------------------- denoiser


@dataclass(frozen=True)
class Denoiser:
    """How to read a masked-diffusion model: its mask token, whether its logits are shifted, its EOS."""

    mask_id: int
    shift: bool
    vocab_size: int


def denoiser_for(model: Any) -> Denoiser:
    """The model's mask token (``config.mask_token_id``, else the known id of its model type) and shift."""
    config = model.config
    model_type = str(getattr(config, "model_type", "")).lower()
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        mask_id = DIFFUSION_MODEL_TYPES.get(model_type)
    if not isinstance(mask_id, int):
        raise PolicyError(f"{type(model).__name__} has no mask token (config.mask_token_id); it cannot be "
                          "decoded as a masked-diffusion model")
    shift = bool(getattr(config, "logits_shift", False)) or model_type == "dream"
    return Denoiser(mask_id=mask_id, shift=shift, vocab_size=int(model.get_output_embeddings().weight.shape[0]))


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(TechniqueConfig):
    """``techniques.diffusion_blocks`` (see the module docstring for what each field does)."""

    technique: ClassVar[str] = NAME
    description: ClassVar[str] = ("Masked-diffusion decoding in blocks: steps or a confidence threshold per block "
                                  "(Fast-dLLM), remasking rule, adaptive block ends (AdaBlock), block KV cache.")

    block_length: int = option(BASELINE_BLOCK, Int(min=1), "tokens decoded per block")
    steps_per_block: int | None = option(BASELINE_BLOCK, Nullable(Int(min=1)), "denoising steps of a full block "
                                         "(null: as many as the threshold needs)")
    threshold: float | None = option(None, Nullable(Number(gt=0, le=1)), "commit every token at least this "
                                     "confident in one step (Fast-dLLM parallel decoding)")
    remasking: str = option("low_confidence", Choice(REMASKING_RULES), "which tokens a step commits first")
    delimiter_threshold: float | None = option(None, Nullable(Number(gt=0, le=1)), "AdaBlock: end a block at a "
                                               "delimiter predicted at least this confidently")
    delimiter_ids: tuple[int, ...] = option((), ListOf(Int(min=0), what="a list of token ids"),
                                            "AdaBlock: the delimiter tokens (newlines)")
    max_block_length: int | None = option(None, Nullable(Int(min=1)), "AdaBlock: longest adaptive block "
                                          "(null: twice block_length)")
    cache: str = option("none", Choice(CACHE_MODES), "block KV cache: none, prefix or dual (Fast-dLLM)")
    seed: int = option(0, Int(min=0), "seed of the random remasking rule")

    def check(self, path: str) -> list[str]:
        problems = []
        if self.steps_per_block is None and self.threshold is None:
            problems.append(f"{path}.steps_per_block: null needs a threshold (else nothing says how many tokens a "
                            "step commits)")
        if self.delimiter_threshold is not None and not self.delimiter_ids:
            problems.append(f"{path}.delimiter_ids: adaptive blocks (delimiter_threshold) need at least one "
                            "delimiter")
        if self.max_block_length is not None and self.max_block_length < self.block_length:
            problems.append(f"{path}.max_block_length: must be an integer >= block_length or null, "
                            f"got {self.max_block_length!r}")
        return problems

    def steps_for(self, length: int) -> int:
        """Steps for a block of ``length`` tokens: ``steps_per_block`` for a full block, proportionally fewer
        (or more) for a shorter last block or an adaptive one, so tokens per forward stay what the policy says."""
        steps = self.steps_per_block or length
        return max(1, math.ceil(steps * length / self.block_length))

    @property
    def window(self) -> int:
        """AdaBlock's search window: how far a delimiter may move a block's end."""
        return self.max_block_length or 2 * self.block_length


def baseline_config() -> DiffusionConfig:
    """One token per forward, blocks of 32, low-confidence remasking, no cache: LLaDA's decoding, the baseline."""
    return DiffusionConfig()


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: `n_masked` tokens over `steps` steps, as evenly as possible, remainder first."""
    steps = max(1, min(steps, n_masked))
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


# ----------------------------------------------------------------------------------------------- cache


class BlockKV:
    """Keys/values of the positions a block's later forwards do not recompute (a Hugging Face ``Cache``
    duck type: attention layers call ``update(key, value, layer_idx)``).

    While recording, ``update`` stores each layer's full keys/values and returns them unchanged (the
    block's first, full forward).  After :meth:`keep_outside` it returns, for a window's forward,
    ``cat(prefix, window, suffix)`` along the sequence; attention is bidirectional and unmasked, so the
    order of keys does not matter once rotary positions are applied."""

    def __init__(self) -> None:
        self.recording = True
        self._full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._outside: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.recording:
            self._full[layer_idx] = (key, value)
            return key, value
        k_out, v_out = self._outside[layer_idx]
        return torch.cat([k_out, key], dim=2), torch.cat([v_out, value], dim=2)

    @property
    def layers(self) -> int:
        return len(self._full)

    def keep_outside(self, start: int, end: int) -> None:
        """Keep positions ``[:start]`` and ``[end:]`` of the recorded forward; later forwards cover ``[start:end]``."""
        def outside(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, :, :start], t[:, :, end:]], dim=2)

        self._outside = {i: (outside(k), outside(v)) for i, (k, v) in self._full.items()}
        self._full = {}
        self.recording = False

    # what HF code may ask a cache object; a block cache is never "grown" by the model
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def supports_block_cache(model: Any) -> bool:
    """Whether ``model``'s forward routes its cache keyword and ``position_ids`` to every attention layer,
    checked exactly: a windowed forward over recorded keys/values must reproduce the full forward's logits."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    device = model.get_input_embeddings().weight.device
    ids = (torch.arange(8, device=device) * 7919 % max(vocab - 1, 1))[None]
    try:
        with torch.inference_mode():
            kv = BlockKV()
            full = model(ids, **cache_arg(model, kv)).logits
            if kv.layers == 0:
                return False
            kv.keep_outside(3, 6)
            positions = torch.arange(3, 6, device=device)[None]
            part = model(ids[:, 3:6], **cache_arg(model, kv), position_ids=positions).logits
    except (TypeError, ValueError, RuntimeError, KeyError):
        return False
    return bool(torch.allclose(part.float(), full[:, 3:6].float(), atol=1e-4, rtol=1e-3))


# ------------------------------------------------------------------------------------------------ loop


@dataclass
class DiffusionStats(DecodeStats):
    """What one generate call did: forwards run, tokens committed per forward, the blocks decoded."""

    report_key = "diffusion"

    forwards: int = 0
    committed: list[int] = field(default_factory=list)
    block_forwards: list[int] = field(default_factory=list)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (start, end) offsets into the generation

    @property
    def tokens(self) -> int:
        return sum(self.committed)

    @property
    def forwards_per_token(self) -> float:
        return self.forwards / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"forwards": self.forwards, "tokens": self.tokens,
                "forwards_per_token": round(self.forwards_per_token, 4), "blocks": [list(b) for b in self.blocks]}


class _Denoise:
    """One decode's forwards, full or windowed over a :class:`BlockKV`. Both return logits whose row j
    predicts the token at position ``start + j`` (shift undone, the mask token suppressed)."""

    def __init__(self, model: Any, spec: Denoiser) -> None:
        self.model, self.spec = model, spec
        self.lead = 1 if spec.shift else 0

    def _rows(self, logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        rows = logits[0, lo - self.lead:hi - self.lead].float()
        rows[:, self.spec.mask_id] = -math.inf  # never predict the mask itself
        return rows

    def full(self, x: torch.Tensor, kv: BlockKV | None, start: int) -> torch.Tensor:
        """A forward over all of ``x``; logits predicting positions ``[start, len(x))``."""
        logits = self.model(x, **cache_arg(self.model, kv)).logits if kv is not None else self.model(x).logits
        return self._rows(logits, start, x.shape[1])

    def window(self, x: torch.Tensor, kv: BlockKV, start: int, end: int) -> torch.Tensor:
        """A forward over ``[start - lead, end)`` only; logits predicting positions ``[start, end)``."""
        lo = start - self.lead
        positions = torch.arange(lo, end, device=x.device)[None]
        logits = self.model(x[:, lo:end], **cache_arg(self.model, kv), position_ids=positions).logits
        return self._rows(logits, self.lead, end - lo)


def _scores(probs: torch.Tensor, tokens: torch.Tensor, rule: str, gen: torch.Generator) -> torch.Tensor:
    """Higher = commit first. ``probs`` (n, V) of the block's positions, ``tokens`` their predictions."""
    if rule == "low_confidence":
        return probs.gather(1, tokens[:, None])[:, 0]
    if rule == "random":
        return torch.rand(probs.shape[0], generator=gen).to(probs.device)
    if rule == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    return (probs * probs.clamp_min(1e-12).log()).sum(-1)  # entropy: minus the predictive entropy


def _predict(logits: torch.Tensor, do_sample: bool, temperature: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, probs): greedy argmax, or one categorical draw per position from softmax(logits / T)."""
    if do_sample and temperature > 0:
        probs = torch.softmax(logits / temperature, -1)
        tokens = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)
        return tokens, probs
    probs = torch.softmax(logits, -1)
    return probs.argmax(-1), probs


def _adaptive_length(tokens: torch.Tensor, probs: torch.Tensor, default: int, cfg: DiffusionConfig) -> int:
    """AdaBlock: the block ends after the first position of the window predicted to be a delimiter with
    probability >= delimiter_threshold; with none, it keeps its default length. Offsets from the block start."""
    span = min(cfg.window, tokens.shape[0])
    tok = tokens[:span]
    conf = probs[:span].gather(1, tok[:, None])[:, 0]
    delimiters = torch.tensor(cfg.delimiter_ids, device=tok.device)
    hit = (torch.isin(tok, delimiters) & (conf >= cfg.delimiter_threshold)).nonzero()
    return int(hit[0, 0]) + 1 if hit.numel() else default


def _commit(x_block: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor, want: int, cfg: DiffusionConfig,
            mask_id: int, gen: torch.Generator) -> int:
    """Commit, in place, every masked position above the threshold and at least ``want`` of them (by the
    remasking rule); returns how many were committed."""
    masked = x_block == mask_id
    commit = torch.zeros_like(masked)
    if cfg.threshold is not None:
        commit = masked & (probs.gather(1, tokens[:, None])[:, 0] > cfg.threshold)
    if int(commit.sum()) < want:
        scores = _scores(probs, tokens, cfg.remasking, gen).masked_fill(~masked, -math.inf)
        scores = scores.masked_fill(commit, math.inf)
        commit[scores.topk(min(want, int(masked.sum()))).indices] = True
    x_block.copy_(torch.where(commit, tokens, x_block))
    return int(commit.sum())


def diffusion_generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, cfg: DiffusionConfig,
                       spec: Denoiser | None = None, *, do_sample: bool = False, temperature: float = 1.0,
                       seed: int | None = None, stats: DiffusionStats | None = None) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after ``input_ids`` (batch 1); returns prompt + generation.

    Every forward commits at least one masked position of the current block, so the loop ends after at
    most ``max_new_tokens`` forwards; a position outside the current block is never committed."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"diffusion decoding takes one non-empty sequence (batch 1), got input_ids of shape "
                         f"{tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        return input_ids
    spec = spec or denoiser_for(model)
    stats = stats if stats is not None else DiffusionStats()
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    denoise = _Denoise(model, spec)
    total = input_ids.shape[1] + max_new_tokens
    x = torch.cat([input_ids, input_ids.new_full((1, max_new_tokens), spec.mask_id)], dim=1)
    start = input_ids.shape[1]
    with torch.inference_mode():
        while start < total:
            kv = BlockKV() if cfg.cache != "none" else None
            logits = denoise.full(x, kv, start)  # the block's first forward: every position from `start` on
            tokens, probs = _predict(logits, do_sample, temperature, gen)
            length = min(cfg.block_length, total - start)
            if cfg.delimiter_threshold is not None:
                length = _adaptive_length(tokens, probs, length, cfg)
            end = start + length
            if kv is not None:
                kv.keep_outside(start - denoise.lead, total if cfg.cache == "prefix" else end)
            schedule = [1] * length if cfg.steps_per_block is None else transfer_schedule(length, cfg.steps_for(length))
            tokens, probs = tokens[:length], probs[:length]
            stats.block_forwards.append(0)
            while True:
                stats.forwards += 1
                stats.block_forwards[-1] += 1
                want = schedule.pop(0) if schedule else 1
                stats.committed.append(_commit(x[0, start:end], tokens, probs, want, cfg, spec.mask_id, gen))
                if not bool((x[0, start:end] == spec.mask_id).any()):
                    break
                if kv is None:
                    logits = denoise.full(x, None, start)[:length]
                else:
                    logits = denoise.window(x, kv, start, total if cfg.cache == "prefix" else end)[:length]
                tokens, probs = _predict(logits, do_sample, temperature, gen)
            stats.blocks.append((start - input_ids.shape[1], end - input_ids.shape[1]))
            start = end
    return x


# --------------------------------------------------------------------------------------------- runtime


class DiffusionHandle(TechniqueHandle):
    """Owns the decode loop of a masked-diffusion model; the model itself is not modified."""

    def __init__(self, cfg: DiffusionConfig, spec: Denoiser) -> None:
        self.config, self.denoiser = cfg, spec
        self.last_stats: DiffusionStats | None = None

    def remove(self) -> None:
        """Nothing to undo: the policy only changes how the loop calls the model."""

    def generate(self, model: Any, input_ids: Any, **kwargs: Any) -> torch.Tensor:
        self.last_stats = DiffusionStats()
        return generate_with(model, input_ids, self.config, self.denoiser, self.last_stats, **kwargs)


def baseline_handle(model: Any) -> DiffusionHandle:
    """The dense decode of a masked-diffusion model: :func:`baseline_config` (LLaDA, one token per forward)."""
    return DiffusionHandle(baseline_config(), denoiser_for(model))


def generate_with(model: Any, input_ids: Any, cfg: DiffusionConfig, spec: Denoiser | None,
                  stats: DiffusionStats | None = None, **kwargs: Any) -> torch.Tensor:
    """``generate``-style entry point (HF keyword names) for one configuration: the dense row uses it with
    :func:`baseline_config`. ``min_new_tokens`` is met by construction (the canvas is ``max_new_tokens`` long);
    an attention mask must be all ones (batch 1, no padding)."""
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).all()):
        raise ValueError("diffusion decoding does not take padded inputs (attention_mask has zeros)")
    max_new = kwargs.get("max_new_tokens")
    if max_new is None:
        raise ValueError("diffusion decoding needs max_new_tokens (the length of the masked canvas)")
    return diffusion_generate(model, input_ids, int(max_new), cfg, spec, do_sample=bool(kwargs.get("do_sample")),
                              temperature=float(kwargs.get("temperature") or 1.0), seed=kwargs.get("seed"),
                              stats=stats)


class DiffusionBlocksRuntime(TechniqueRuntime):
    """Runtime of ``techniques.diffusion_blocks``: applies to masked-diffusion models only."""

    name = NAME
    config_class = DiffusionConfig
    order = 210
    owns_generate = True
    model_kinds = (MASKED_DIFFUSION,)

    def apply(self, model: Any, config: DiffusionConfig | dict[str, Any]) -> DiffusionHandle:
        cfg = self.config_of(config)
        spec = denoiser_for(model)
        if cfg.cache != "none" and not supports_block_cache(model):
            raise PolicyError(f"techniques.diffusion_blocks.cache: {type(model).__name__} does not route "
                              "its cache/position_ids to its attention layers; use cache: none")
        return DiffusionHandle(cfg, spec)


register_runtime(DiffusionBlocksRuntime())
