"""Token retention: drop prompt rows between decoder layers during prefill, following a per-layer schedule.

Policy section (``techniques.token_retention``)::

    keep: [1.0, 1.0, 0.7, 0.7, 0.4, 0.4]   # per layer, len == num_layers, each in (0, 1], non-increasing,
                                           # keep[0] == 1.0 (see "positions" below)
    scorer: attention                      # "attention" (FastV / PyramidDrop) or "l2norm" (hidden-row norm)
    window: 8                              # the last w prompt tokens score the others and are never dropped
    pool: 1                                # odd: max-pool the scores over this many neighbouring rows (SnapKV)
    sinks: 4                               # the first tokens are never dropped (attention sinks)
    scope: null                            # or [start, end): dropping only inside this token span
    min_prompt_tokens: 64                  # shorter prompts run dense

``keep[l]`` is the fraction of the prompt tokens inside ``scope`` (the whole prompt when null) that layer ``l``
processes; tokens outside the scope, the sinks and the window are always kept (``kept_counts`` gives the exact
integers; the search space's cost model uses the same function so prediction and runtime never disagree).

How it works, without forking any modeling code (Llama, Mistral, Qwen2, Qwen3, Phi-3 and relatives whose
layers take ``position_embeddings=(cos, sin)`` and whose attention goes through ``AttentionInterface``):

- a forward pre-hook on the backbone notes, per forward, which sequence slots the rows are (a fresh prefill
  starts at slot 0; a decode step continues at ``cache.get_seq_length()``) and the 2D padding mask;
- a forward pre-hook on each decoder layer, where the schedule drops tokens, keeps the best-scored rows of the
  previous layer's output and slices ``hidden_states``, ``position_embeddings`` and ``position_ids`` to them.
  Kept tokens keep their original absolute positions: cos/sin are *sliced*, never recomputed or renumbered;
- the model's attention implementation is switched to ``autotune_tr_<original>``, registered with
  ``transformers.AttentionInterface``; it delegates the output to the original function (``sdpa`` or the
  model's own ``eager``) and (1) on the scoring layer (the one just before a drop) also computes the
  attention of the last ``window`` queries over all keys, averaged over heads and window queries, from the
  post-RoPE (post q/k-norm) query and key states it receives, (2) on layers that dropped tokens, replaces the
  attention mask by one built from the slots the layer's queries and keys really are (see below).

Positions, caches and masks (the design choice). Each layer's ``DynamicCache`` entry holds only the tokens
that layer kept, so per-layer KV lengths differ. Hugging Face derives decode positions and the mask size from
the cache's ``get_seq_length()``, i.e. layer 0's length (transformers#35168). We therefore **require
``keep[0] == 1.0``**: layer 0 holds every token, so HF's decode positions ``p = prompt_len + t`` and
``generate``'s bookkeeping stay right, and layer 0 is the first scoring layer (no schedule drops before any
layer has looked at the tokens). For the shorter layers HF's mask has the wrong width, so the runtime tracks
the slot of every cache entry per layer (appended in order; a cache keeps a suffix of what it was given, so the
``K`` keys that attention receives are the last ``K`` tracked slots, for full and sliding-window layers alike,
and a ``cache.crop`` is followed by trimming) and builds the mask itself: key slot <= query slot, within the
sliding window if the layer has one, and not padding. When that mask is what SDPA would do anyway (a single
decode query seeing everything, or a prefill whose queries are its keys) it passes ``None`` so SDPA keeps its
fast ``is_causal`` path. Layers before the first drop are untouched: with ``keep`` all 1.0 the outputs are
bit-identical to the dense model.

Tree speculative decoding (``policies.speculative``) composes with this: the prefill is pruned, then each verify
forward runs [root] + draft tree with its own 4D mask (columns = slots ``0 .. n_past + n_tree - 1``, ``n_past``
being layer 0's length) and depth positions. Dense layers receive that mask unchanged from HF; a pruned layer
takes its columns at the layer's key slots (the mask decides visibility, not slot order; the tree's rows take
the slots ``n_past .. n_past + n_tree - 1``). ``tree_attention.compact_cache`` then gathers every layer to its
context plus the accepted nodes and calls the listener this runtime put in the cache's
``autotune_compact_listeners``: the pruned layers' tracked slots become their context slots plus
``n_past .. n_past + n_accepted - 1`` (where layer 0 holds those tokens now). A backbone forward over a swapped
layer list (the layer-skip drafter, on its own cache) runs dense and leaves this sequence's state alone.

Outputs. The final norm and LM head run only on the rows the last layer kept: a plain ``model(input_ids)``
with drops returns logits for those rows only (``handle.last_kept_indices[-1]`` maps them to prompt
positions; the last prompt token is always among them, so ``generate`` and next-token use are unaffected).
``labels`` / ``output_hidden_states`` therefore do not line up with the prompt when drops happen.

Limits: batch size 1 whenever a drop happens (a clear ``ValueError`` otherwise; batched prompts shorter than
``min_prompt_tokens`` run dense); dynamic caches only (a ``StaticCache`` cannot hold per-layer lengths);
attention implementations ``sdpa`` and ``eager`` (flash kernels cannot take the masks of pruned layers).
"""

from __future__ import annotations

import inspect
import math
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from policies.config import Choice, Int, ListOf, Nullable, Number, TechniqueConfig, option, required
from policies.registry import TechniqueHandle, TechniqueRuntime, register_runtime
from policies.schema import PolicyError
from profilers.hf_compat import hook_cache
from profilers.model_parts import decoder_parts
from profilers.peak_memory import cache_nbytes  # noqa: F401 - re-exported: measured KV-cache size

__all__ = [
    "DEFAULTS",
    "SCORERS",
    "TokenRetentionConfig",
    "TokenRetentionHandle",
    "TokenRetentionRuntime",
    "cache_nbytes",
    "droppable_mask",
    "kept_counts",
    "kept_counts_for_section",
    "kv_cache_bytes",
    "pool_scores",
    "select_kept",
]

NAME = "token_retention"
SECTION_PATH = f"techniques.{NAME}"
SCORERS: tuple[str, ...] = ("attention", "l2norm")
_SUPPORTED_ATTN = ("sdpa", "eager")
_IMPL_PREFIX = "autotune_tr_"


# ---------------------------------------------------------------------------------------------------------------
# The section: its config class, and the pure arithmetic the cost model shares with the runtime.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TokenRetentionConfig(TechniqueConfig):
    """``techniques.token_retention`` (see the module docstring). The layer count is not checked here (a policy
    file is validated without the model); ``apply`` checks it."""

    technique: ClassVar[str] = NAME
    description: ClassVar[str] = "Drop prompt tokens between decoder layers during prefill (FastV / PyramidDrop style)."

    keep: tuple[float, ...] = required(
        ListOf(Number(gt=0, le=1), min_items=1), "per layer (len == num_layers): fraction of the in-scope prompt "
        "tokens the layer processes; non-increasing with depth; keep[0] must be 1.0",
        json_extra={"prefixItems": [{"const": 1.0}]})
    scorer: str = option("attention", Choice(SCORERS), "how rows are ranked: attention of the window (FastV, "
                         "PyramidDrop) or the hidden row's L2 norm")
    window: int = option(8, Int(min=1), "last w prompt tokens: they score the others and are never dropped")
    pool: int = option(1, Int(min=1), "odd kernel: each droppable row scores the max over this many neighbouring "
                       "rows (SnapKV's pooling), so a span survives whole around its best-scored token; 1: off")
    sinks: int = option(4, Int(min=0), "first tokens, never dropped (attention sinks)")
    scope: tuple[int, int] | None = option(
        None, Nullable(ListOf(Int(min=0), min_items=2, max_items=2, what="[start, end) with 0 <= start < end "
                              "integers")), "[start, end) token span where dropping is allowed (null: the prompt)")
    min_prompt_tokens: int = option(64, Int(min=0), "shorter prompts run dense")

    def check(self, path: str) -> list[str]:
        problems = []
        if self.keep[0] != 1:
            problems.append(f"{path}.keep[0]: must be 1.0 (layer 0 sees every token: it scores the first drop, and "
                            f"decode positions come from layer 0's cache length), got {self.keep[0]!r}")
        for i in range(1, len(self.keep)):
            if self.keep[i] > self.keep[i - 1]:
                problems.append(f"{path}.keep: must be non-increasing with depth (keep[{i}]={self.keep[i]} > "
                                f"keep[{i - 1}]={self.keep[i - 1]})")
                break
        if self.pool % 2 == 0:
            problems.append(f"{path}.pool: must be an odd kernel size (the row itself plus as many on each side), "
                            f"got {self.pool}")
        if self.scope is not None and not self.scope[0] < self.scope[1]:
            problems.append(f"{path}.scope: must be [start, end) with 0 <= start < end integers or null, "
                            f"got {list(self.scope)!r}")
        return problems

    def counts(self, n_prompt: int) -> list[int]:
        """Tokens each layer processes for a prompt of ``n_prompt`` tokens (``kept_counts`` with this config)."""
        return kept_counts(self.keep, n_prompt, self.sinks, self.window, self.scope,
                           min_prompt_tokens=self.min_prompt_tokens)


#: Values of the optional fields when a section leaves them out (derived from the config class).
DEFAULTS: dict[str, Any] = TokenRetentionConfig.defaults()


def _scope_bounds(n_prompt: int, scope: Sequence[int] | None) -> tuple[int, int]:
    if scope is None:
        return 0, n_prompt
    start = min(max(int(scope[0]), 0), n_prompt)
    return start, min(max(int(scope[1]), start), n_prompt)


def _round_half_up(x: float) -> int:
    # The epsilon absorbs binary noise (0.15 * 50 = 7.499999...) so "half" means half as written in YAML.
    return math.floor(x + 0.5 + 1e-9)


def kept_counts(
    keep: Sequence[float],
    n_prompt: int,
    sinks: int = DEFAULTS["sinks"],
    window: int = DEFAULTS["window"],
    scope: Sequence[int] | None = None,
    *,
    min_prompt_tokens: int = 0,
) -> list[int]:
    """Number of prompt tokens each layer processes (and holds in its KV cache after prefill).

    Inside the scope (``[start, end)`` clipped to the prompt; the whole prompt when None) layer ``l`` keeps
    ``round(keep[l] * n_scope)`` tokens (halves up), but never fewer than the protected ones there (the first
    ``sinks`` and the last ``window`` tokens of the prompt); every token outside the scope is kept. Prompts
    shorter than ``min_prompt_tokens`` (or of one token) run dense. Pure arithmetic, shared by the runtime and
    the search space's cost model so that prediction and execution agree token for token.
    """
    n = int(n_prompt)
    if n <= 1 or n < min_prompt_tokens:
        return [n] * len(keep)
    start, end = _scope_bounds(n, scope)
    n_scope = end - start
    protected = sum(1 for i in range(start, end) if i < sinks or i >= n - window)
    out = []
    for k in keep:
        in_scope = min(n_scope, max(protected, _round_half_up(float(k) * n_scope)))
        out.append(n - n_scope + in_scope)
    return out


def kept_counts_for_section(section: dict[str, Any], n_prompt: int) -> list[int]:
    """``kept_counts`` for a policy section, defaults included (``min_prompt_tokens`` too)."""
    return TokenRetentionConfig.from_section(section).counts(n_prompt)


def kv_cache_bytes(
    kept: Sequence[int],
    *,
    num_key_value_heads: int,
    head_dim: int,
    bytes_per_element: int,
    new_tokens: int = 0,
) -> int:
    """Bytes of keys + values in a cache whose layer ``l`` holds ``kept[l]`` prompt tokens plus ``new_tokens``
    decoded ones (every decoded token is kept by every layer)."""
    per_token = 2 * int(num_key_value_heads) * int(head_dim) * int(bytes_per_element)
    return sum((int(k) + int(new_tokens)) * per_token for k in kept)


def droppable_mask(
    slots: torch.Tensor, n_prompt: int, sinks: int, window: int, scope: Sequence[int] | None
) -> torch.Tensor:
    """Which of the prompt tokens at ``slots`` a schedule may drop: inside the scope, not a sink, not in the
    last ``window``."""
    start, end = _scope_bounds(n_prompt, scope)
    return (slots >= max(start, sinks)) & (slots < min(end, n_prompt - window))


def pool_scores(scores: torch.Tensor, droppable: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each droppable row's score becomes the max over the ``kernel`` droppable rows centred on it (in row
    order; protected rows neither give nor take). Why: a small model's attention marks one or two tokens of a
    fact, not all of them, and a passkey's five digits survive only together (SnapKV pools the observation
    window's scores for the same reason, arXiv 2404.14469)."""
    if kernel <= 1:
        return scores
    masked = torch.where(droppable, torch.nan_to_num(scores.float(), nan=-math.inf), -math.inf)
    pooled = torch.nn.functional.max_pool1d(masked[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
    return torch.where(droppable, pooled, scores.float())


def select_kept(scores: torch.Tensor, droppable: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Local indices (sorted) of the rows to keep: every protected row, plus the best-scored droppable rows up
    to ``n_keep`` rows in all. Ties go to the earlier token (stable sort), NaN scores rank last."""
    protected = ~droppable
    n_free = max(0, int(n_keep) - int(protected.sum()))
    candidates = droppable.nonzero().squeeze(1)
    keep_mask = protected.clone()
    if n_free > 0 and candidates.numel() > 0:
        cand_scores = torch.nan_to_num(scores[candidates].float(), nan=-math.inf)
        order = torch.argsort(-cand_scores, stable=True)
        keep_mask[candidates[order[:n_free]]] = True
    return keep_mask.nonzero().squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Runtime state and the attention function.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Forward:
    """What one forward of the backbone needs to know (reset by the backbone pre-hook)."""

    past_len: int
    q_len: int
    fresh: bool  # a prefill starting at slot 0: the schedule may drop here
    counts: list[int] | None  # per-layer rows when this forward drops, else None
    score_layers: frozenset[int]
    cur_slots: torch.Tensor  # slots of the rows currently flowing through the layers
    pad: torch.Tensor | None  # bool over slots (True = real token) when the 2D mask has padding
    has_cache: bool = False
    custom_mask: torch.Tensor | None = None  # a 4D mask given to a decode forward (tree verification)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    sliced: tuple[Any, Any, Any] | None = None  # (backbone's position_embeddings, rows of them, position_ids)


@dataclass
class _Sequence:
    """What persists across the forwards of one sequence (a prefill and its decode steps)."""

    pruned: list[bool]  # layer holds a strict subset of the slots (its masks are ours)
    slots: list[torch.Tensor | None]  # per pruned layer: slot of every entry appended to its cache, in order
    cache_ref: Any = None  # weakref to the cache the prefill filled
    n_prompt: int = 0


# attention module -> (weak ref to the retention state, layer index). Weak both ways, so that a model dropped
# without remove() is still freed (a strong value would keep its own key alive).
_ATTN_OWNERS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[_Retention], int]] = weakref.WeakKeyDictionary()
_REGISTERED: set[str] = set()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _allowed(
    q_slots: torch.Tensor, k_slots: torch.Tensor, sliding_window: int | None, pad: torch.Tensor | None
) -> torch.Tensor:
    """[q, K] bool: causal by slot, within the sliding window (HF: ``k > q - window``), keys not padding."""
    allowed = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :]) < int(sliding_window)
    if pad is not None:
        allowed &= pad[k_slots][None, :]
        empty = ~allowed.any(dim=-1)
        if bool(empty.any()):  # padded queries: attend anywhere (finite garbage, never used) instead of NaN
            allowed[empty] = True
    return allowed


def _make_attention(original: str) -> Callable[..., Any]:
    """The attention function registered as ``autotune_tr_<original>``."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        owner = _ATTN_OWNERS.get(module)
        state = owner[0]() if owner is not None else None
        if state is None:  # a module this runtime does not own (the registry is process-wide): plain original
            return _original_fn(module, original)(module, query, key, value, attention_mask, **kwargs)
        return state.attention(owner[1], module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{_IMPL_PREFIX}{original}"
    return attention


def _original_fn(module: nn.Module, original: str) -> Callable[..., Any]:
    """The function the model would have used: ``sdpa`` from the registry, ``eager`` from the modeling file."""
    if original == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


def _register_impl(original: str) -> str:
    """Register ``autotune_tr_<original>`` (attention + the original's mask builder) once per process."""
    name = f"{_IMPL_PREFIX}{original}"
    if name not in _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(name, _make_attention(original))
        # Same mask builder as the original, so dense layers receive exactly the mask they would have.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        _REGISTERED.add(name)
    return name


def _cache_len(cache: Any, layer: int) -> int:
    """Entries ever appended to ``layer`` and not cropped (a sliding layer's cumulative length)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers):
        return 0
    return int(cache.get_seq_length(layer))


class _CompactListener:
    """Called by ``tree_attention.compact_cache`` on the cache a pruned prefill filled (speculative decoding):
    re-maps the pruned layers' tracked slots. Weak references only, so the cache keeps neither the model's state
    nor an old sequence alive; it does nothing once the handle is removed or another prefill took over."""

    def __init__(self, state: _Retention, seq: _Sequence) -> None:
        self.state_ref = weakref.ref(state)
        self.seq_ref = weakref.ref(seq)

    @classmethod
    def register(cls, cache: Any, state: _Retention, seq: _Sequence) -> None:
        listeners = getattr(cache, "autotune_compact_listeners", None)
        if listeners is None:
            listeners = []
            cache.autotune_compact_listeners = listeners
        # One listener per state and cache: a cache refilled from scratch drops its previous one.
        listeners[:] = [fn for fn in listeners if not (isinstance(fn, cls) and fn.state_ref() in (None, state))]
        listeners.append(cls(state, seq))

    def __call__(self, n_tree: int, keep_nodes: Sequence[int]) -> None:
        state, seq = self.state_ref(), self.seq_ref()
        if state is None or seq is None or not state.active or state.seq is not seq:
            return
        state.on_compact(seq, n_tree, keep_nodes)


class _Retention:
    """The live state of one application: hooks call into it; the attention function reports to it."""

    def __init__(self, model: nn.Module, spec: TokenRetentionConfig, original: str) -> None:
        parts = decoder_parts(model)
        self.config = spec
        self.original = original
        self.layers = parts.layers
        self.base = parts.base
        self.num_layers = len(parts.layers)
        self.attn_modules = [layer.self_attn for layer in parts.layers]
        self.originals = [_original_fn(m, original) for m in self.attn_modules]
        self.base_signature = inspect.signature(self.base.forward)
        owner_path, _, attr = parts.layers_path.rpartition(".")
        self._layers_owner = model.get_submodule(owner_path) if owner_path else model
        self._layers_attr = attr
        self._layers_container = getattr(self._layers_owner, attr)
        self.active = True  # False once the handle is removed (compaction listeners then do nothing)
        self.fwd: _Forward | None = None
        self.seq = _Sequence(pruned=[False] * self.num_layers, slots=[None] * self.num_layers)
        self.score_override: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.last_kept_indices: list[torch.Tensor] | None = None
        self.last_scores: dict[int, torch.Tensor] = {}
        self.last_counts: list[int] | None = None

    # -- backbone hooks ------------------------------------------------------------------------------------
    def base_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.base_signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None or getattr(self._layers_owner, self._layers_attr, None) is not self._layers_container:
            # No rows, or the backbone runs a swapped layer list (speculative decoding's layer-skip drafter, on
            # its own cache): that forward runs dense and leaves the sequence state alone.
            self.fwd = None
            return
        batch, q_len = int(ref.shape[0]), int(ref.shape[1])
        device = ref.device
        cache = hook_cache({**extra, **bound})
        mask = bound.get("attention_mask", extra.get("attention_mask"))
        past_len = int(cache.get_seq_length()) if cache is not None else 0
        spec, seq = self.config, self.seq
        counts: list[int] | None = None
        if past_len == 0:
            counts = spec.counts(q_len) if q_len > 1 else None
            if counts is not None and all(c == q_len for c in counts):
                counts = None
            self.seq = seq = _Sequence(
                pruned=[counts is not None and c < q_len for c in (counts or [q_len] * self.num_layers)],
                slots=[None] * self.num_layers,
                n_prompt=q_len,
            )
            if counts is not None:
                if batch != 1:
                    raise ValueError(
                        f"token_retention: a prompt of {q_len} tokens would drop tokens, which needs batch size 1 "
                        f"(got {batch}); run prompts one by one or raise min_prompt_tokens above {q_len}"
                    )
                if isinstance(mask, torch.Tensor) and mask.ndim != 2:
                    raise ValueError("token_retention: a custom 4D attention_mask cannot be combined with dropping")
                if cache is not None and not all(type(layer).__name__.startswith("Dynamic")
                                                 for layer in getattr(cache, "layers", [])):
                    raise ValueError(
                        f"token_retention: per-layer KV lengths need a DynamicCache, got {type(cache).__name__}"
                    )
        elif seq.cache_ref is not None and seq.cache_ref() is cache:  # continuing the sequence we prefilled
            if any(seq.pruned) and batch != 1:
                raise ValueError(f"token_retention: the cache was pruned for batch size 1, got batch size {batch}")
        else:
            self._adopt_foreign(cache, past_len)
        pad = None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and batch == 1 and not bool(mask.all()):
            pad = mask[0].to(device=device, dtype=torch.bool)
        custom_mask = None
        if past_len > 0 and isinstance(mask, torch.Tensor) and mask.ndim == 4 and any(self.seq.pruned):
            if mask.shape[-1] < past_len + q_len or mask.shape[-2] != q_len:
                raise ValueError(
                    f"token_retention: a 4D attention_mask for {q_len} queries after {past_len} cached tokens must "
                    f"have shape (batch, 1, {q_len}, {past_len + q_len}), got {tuple(mask.shape)}"
                )
            custom_mask = mask
        score_layers = frozenset()
        if counts is not None:
            score_layers = frozenset(i - 1 for i in range(1, self.num_layers) if counts[i] < counts[i - 1])
        self.fwd = _Forward(
            past_len=past_len,
            q_len=q_len,
            fresh=past_len == 0,
            counts=counts,
            score_layers=score_layers,
            cur_slots=torch.arange(past_len, past_len + q_len, device=device),
            pad=pad,
            custom_mask=custom_mask,
        )
        if past_len == 0:
            self.last_scores = {}
            self.last_kept_indices = [None] * self.num_layers  # type: ignore[list-item]
            self.last_counts = list(counts) if counts is not None else [q_len] * self.num_layers

    def _adopt_foreign(self, cache: Any, past_len: int) -> None:
        """A cache this runtime did not prune (or a continued dense one): fine iff every full-attention layer
        holds the same number of tokens; then all layers are dense for the rest of the sequence."""
        for i, layer in enumerate(getattr(cache, "layers", []) or []):
            if not getattr(layer, "is_sliding", False) and _cache_len(cache, i) not in (0, past_len):
                raise RuntimeError(
                    "token_retention: this cache holds different lengths per layer but is not the one the last "
                    "pruned prefill filled; continue a pruned sequence right after its prefill"
                )
        self.seq = _Sequence(pruned=[False] * self.num_layers, slots=[None] * self.num_layers, n_prompt=past_len)

    def base_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.fwd = None  # layers called outside a backbone forward are left alone

    # -- layer hook ----------------------------------------------------------------------------------------
    def layer_pre_hook(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        fwd, seq = self.fwd, self.seq
        if fwd is None:
            return None
        cache = hook_cache(kwargs)
        if layer == 0:
            fwd.has_cache = cache is not None
            if fwd.fresh and cache is not None:
                seq.cache_ref = weakref.ref(cache)
                if any(seq.pruned):
                    _CompactListener.register(cache, self, seq)
        changed = False
        if fwd.counts is not None and layer > 0 and fwd.counts[layer] < fwd.counts[layer - 1]:
            args, kwargs = self._drop(layer, args, kwargs)
        if fwd.cur_slots.numel() != fwd.q_len:
            self._slice_positions(kwargs)
            changed = True
        if seq.pruned[layer] and cache is not None:
            known = seq.slots[layer]
            n_cached = _cache_len(cache, layer)
            if known is None:
                known = fwd.cur_slots[:0]
            if n_cached < known.numel():  # the cache was cropped (assisted decoding): drop the same suffix
                known = known[:n_cached]
            elif n_cached > known.numel():
                raise RuntimeError(f"token_retention: layer {layer} cache holds entries this runtime did not see")
            seq.slots[layer] = torch.cat([known, fwd.cur_slots])
        if fwd.fresh and self.last_kept_indices is not None:
            self.last_kept_indices[layer] = fwd.cur_slots
        return (args, kwargs) if changed else None

    def _drop(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Keep the best ``counts[layer]`` rows of the previous layer's output; slice what goes with them."""
        fwd = self.fwd
        assert fwd is not None and fwd.counts is not None
        hidden = args[0] if args else kwargs["hidden_states"]
        slots = fwd.cur_slots
        scores = fwd.scores.pop(layer - 1, None)
        if scores is None:
            if self.config.scorer == "attention":
                raise RuntimeError(f"token_retention: layer {layer - 1} did not report attention scores")
            scores = hidden[0].float().norm(dim=-1)  # l2norm: energy of each residual-stream row
        if self.score_override is not None:
            scores = self.score_override(layer - 1, hidden, slots)
        self.last_scores[layer - 1] = scores.detach()
        spec = self.config
        droppable = droppable_mask(slots, self.seq.n_prompt, spec.sinks, spec.window, spec.scope)
        sel = select_kept(pool_scores(scores, droppable, spec.pool), droppable, fwd.counts[layer])
        fwd.cur_slots = slots[sel]
        fwd.sliced = None
        hidden = hidden[:, sel]
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _slice_positions(self, kwargs: dict) -> None:
        """Every layer gets the backbone's full-length ``position_embeddings`` / ``position_ids``; a layer after a
        drop takes the rows of its tokens (original absolute positions, never renumbered). Sliced once per
        forward and drop, then shared by the following layers."""
        fwd = self.fwd
        assert fwd is not None
        pe, pos = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if fwd.sliced is None or fwd.sliced[0] is not pe:
            glob = fwd.cur_slots - fwd.past_len  # index into this forward's full-length tensors
            new_pe = (pe[0][:, glob], pe[1][:, glob]) if isinstance(pe, tuple) and len(pe) == 2 else pe
            new_pos = pos[..., glob] if isinstance(pos, torch.Tensor) and pos.shape[-1] == fwd.q_len else pos
            fwd.sliced = (pe, new_pe, new_pos)
        kwargs["position_embeddings"] = fwd.sliced[1]
        if "position_ids" in kwargs:
            kwargs["position_ids"] = fwd.sliced[2]

    # -- attention -----------------------------------------------------------------------------------------
    def attention(self, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        fwd, seq = self.fwd, self.seq
        window = kwargs.get("sliding_window")
        if fwd is not None and seq.pruned[layer]:
            if fwd.custom_mask is not None:
                attention_mask = self._custom_mask(layer, query, key, fwd)
            else:
                attention_mask = self._pruned_mask(layer, query, key, window, fwd)
        out = self.originals[layer](module, query, key, value, attention_mask, **kwargs)
        if fwd is not None and layer in fwd.score_layers and self.config.scorer == "attention" and query.shape[2] > 1:
            scaling = kwargs.get("scaling", getattr(module, "scaling", query.shape[-1] ** -0.5))
            fwd.scores[layer] = self._window_scores(query, key, fwd.cur_slots, scaling, window, fwd.pad)
        return out

    def _key_slots(self, layer: int, n_keys: int, fwd: _Forward) -> torch.Tensor:
        if not fwd.has_cache:
            slots = fwd.cur_slots
        else:
            known = self.seq.slots[layer]
            slots = fwd.cur_slots if known is None else known[-n_keys:]
        if slots.numel() != n_keys:
            raise RuntimeError(f"token_retention: layer {layer} got {n_keys} keys but tracks {slots.numel()} slots")
        return slots

    def _pruned_mask(self, layer: int, query: torch.Tensor, key: torch.Tensor, window: int | None,
                     fwd: _Forward) -> torch.Tensor | None:
        """The mask of a layer whose keys are a subset of the slots: built from the slots themselves."""
        q_len, n_keys = query.shape[2], key.shape[2]
        q_slots = fwd.cur_slots
        if q_len == 1 and window is None and fwd.pad is None:
            return None  # one decode query sees every cached key (all are earlier slots), for SDPA and eager
        k_slots = self._key_slots(layer, n_keys, fwd)
        if (
            self.original == "sdpa"
            and q_len == n_keys
            and fwd.pad is None
            and (window is None or int(k_slots[-1] - k_slots[0]) < window)
            and torch.equal(q_slots, k_slots)
        ):
            return None  # a prefill whose queries are its keys: SDPA's is_causal does exactly this, fast
        allowed = _allowed(q_slots, k_slots, window, fwd.pad)
        if q_len == 1 and bool(allowed.all()):
            return None
        allowed = allowed[None, None]
        if self.original == "eager":
            return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~allowed, torch.finfo(query.dtype).min
            )
        return allowed

    def _custom_mask(self, layer: int, query: torch.Tensor, key: torch.Tensor, fwd: _Forward) -> torch.Tensor:
        """A decode forward's own 4D mask (tree verification) in a pruned layer: its columns are the slots of the
        full-length sequence, so the layer's mask is those columns at its key slots; the mask decides visibility
        (not slot order), as it does in the dense layers, which receive it unchanged."""
        assert fwd.custom_mask is not None
        k_slots = self._key_slots(layer, key.shape[2], fwd)
        mask = fwd.custom_mask.to(query.device).index_select(-1, k_slots)
        if mask.dtype == torch.bool:
            if self.original == "sdpa":
                return mask
            return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
        if mask.dtype != query.dtype:  # additive: keep the values, clamped so that "masked" stays finite
            mask = mask.float().clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        return mask

    def _window_scores(self, query: torch.Tensor, key: torch.Tensor, slots: torch.Tensor, scaling: float,
                       window: int | None, pad: torch.Tensor | None) -> torch.Tensor:
        """Attention of the last ``window`` queries over all keys, averaged over heads and those queries.

        Computed on the side for this layer only (the output still comes from the original kernel), in float32
        like HF's eager softmax. Prefill only: the keys are this forward's rows, the same slots as the queries.
        """
        with torch.no_grad():
            w = min(self.config.window, query.shape[2])
            q = query[:1, :, -w:].float()
            k = _repeat_kv(key[:1].float(), query.shape[1] // key.shape[1])
            logits = torch.matmul(q, k.transpose(-1, -2)) * scaling
            allowed = _allowed(slots[-w:], slots, window, pad)
            logits = logits.masked_fill(~allowed[None, None], -math.inf)
            probs = torch.softmax(logits, dim=-1)
            return probs.mean(dim=(1, 2))[0]

    def on_compact(self, seq: _Sequence, n_tree: int, keep_nodes: Sequence[int]) -> None:
        """``tree_attention.compact_cache`` kept, of the last ``n_tree`` entries of every layer, the accepted nodes
        (in path order): they now sit right after the context, i.e. at layer 0's next consecutive slots."""
        cache = seq.cache_ref() if seq.cache_ref is not None else None
        if cache is None:
            return
        n_keep = len(keep_nodes)
        past_full = _cache_len(cache, 0) - n_keep  # layer 0 holds every slot: context + accepted nodes
        for layer, known in enumerate(seq.slots):
            if not seq.pruned[layer] or known is None:
                continue
            if known.numel() < n_tree:
                raise RuntimeError(f"token_retention: layer {layer} tracks {known.numel()} slots, fewer than the "
                                   f"{n_tree} tree tokens being compacted")
            new = torch.arange(past_full, past_full + n_keep, device=known.device, dtype=known.dtype)
            seq.slots[layer] = torch.cat([known[: known.numel() - n_tree], new])

    def kv_lengths(self) -> list[int] | None:
        """Per-layer KV-cache lengths of the cache the last pruned prefill filled (None if it is gone)."""
        cache = self.seq.cache_ref() if self.seq.cache_ref is not None else None
        if cache is None:
            return None
        return [_cache_len(cache, i) for i in range(self.num_layers)]


# ---------------------------------------------------------------------------------------------------------------
# Handle and runtime.
# ---------------------------------------------------------------------------------------------------------------


class TokenRetentionHandle(TechniqueHandle):
    """Undo handle of an applied schedule, plus what tests and the bench read back.

    Attributes:
        spec: the section with defaults filled in.
        last_kept_indices: after a prefill, per layer, the prompt positions (LongTensor) of the rows that layer
            processed and cached; ``[-1]`` maps the rows of ``model(input_ids).logits`` to prompt positions.
        last_scores: after a prefill with drops, per scoring layer, the importance of each row of that layer
            (aligned with ``last_kept_indices[layer]``).
        last_counts: after a prefill, per layer, the number of rows (``kept_counts`` for that prompt).
        score_override: test/experiment seam: ``f(scoring_layer, hidden_states, slots) -> scores`` replaces
            the scorer's output at every drop.
    """

    def __init__(self, model: nn.Module, state: _Retention, undo: list[Callable[[], None]]) -> None:
        self.model = model
        self._state = state
        self._undo: list[Callable[[], None]] | None = undo

    @property
    def config(self) -> TokenRetentionConfig:
        return self._state.config

    @property
    def last_kept_indices(self) -> list[torch.Tensor] | None:
        return self._state.last_kept_indices

    @property
    def last_scores(self) -> dict[int, torch.Tensor]:
        return self._state.last_scores

    @property
    def last_counts(self) -> list[int] | None:
        return self._state.last_counts

    @property
    def score_override(self) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        return self._state.score_override

    @score_override.setter
    def score_override(self, fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        self._state.score_override = fn

    def kv_lengths(self) -> list[int] | None:
        """Per-layer KV lengths of the cache the last prefill filled (None when there was no cache)."""
        return self._state.kv_lengths()

    def kept_counts(self, n_prompt: int) -> list[int]:
        """Rows per layer this schedule gives a prompt of ``n_prompt`` tokens."""
        return self._state.config.counts(n_prompt)

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is None:
            return
        first: BaseException | None = None
        for fn in reversed(undo):
            try:
                fn()
            except BaseException as exc:  # restore as much as possible, report the first failure
                first = first or exc
        if first is not None:
            raise first


class TokenRetentionRuntime(TechniqueRuntime):
    """``techniques.token_retention``: per-layer prefill token dropping (see the module docstring)."""

    name = NAME
    config_class = TokenRetentionConfig
    order = 100  # forward hooks: after weight edits, before decode-loop owners

    def apply(self, model: Any, config: TokenRetentionConfig | dict[str, Any]) -> TokenRetentionHandle:
        spec = self.config_of(config)
        parts = decoder_parts(model)
        n_layers = len(parts.layers)
        if len(spec.keep) != n_layers:
            raise PolicyError(f"{SECTION_PATH}.keep: has {len(spec.keep)} entries, the model has {n_layers} layers")
        config = getattr(model, "config", None)
        original = getattr(config, "_attn_implementation", None)
        if isinstance(original, str) and original.startswith(_IMPL_PREFIX):
            raise ValueError("token_retention is already applied to this model; remove the other handle first")
        if original not in _SUPPORTED_ATTN:
            raise ValueError(
                f"token_retention needs attn_implementation 'sdpa' or 'eager', the model uses {original!r}; "
                "load it with attn_implementation='sdpa'"
            )
        if parts.base is None or not all(isinstance(getattr(m, "self_attn", None), nn.Module) for m in parts.layers):
            raise ValueError(f"token_retention: {type(model).__name__} has no Llama-style self_attn decoder layers")
        state = _Retention(model, spec, original)
        undo: list[Callable[[], None]] = []
        try:
            undo.append(lambda: setattr(state, "active", False))
            for i, attn in enumerate(state.attn_modules):
                _ATTN_OWNERS[attn] = (weakref.ref(state), i)
            undo.append(lambda: [_ATTN_OWNERS.pop(a, None) for a in state.attn_modules])
            impl = _register_impl(original)
            model.set_attn_implementation(impl)
            if config._attn_implementation != impl:
                raise RuntimeError(f"token_retention: could not switch {type(model).__name__} to {impl}")
            undo.append(lambda: _restore_impl(model, original))
            hooks = [
                state.base.register_forward_pre_hook(state.base_pre_hook, with_kwargs=True),
                state.base.register_forward_hook(state.base_post_hook, with_kwargs=True, always_call=True),
            ]
            for i, layer in enumerate(state.layers):
                hooks.append(layer.register_forward_pre_hook(_bind(state.layer_pre_hook, i), with_kwargs=True))
            undo.append(lambda: [h.remove() for h in hooks])
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        return TokenRetentionHandle(model, state, undo)


def _bind(fn: Callable[..., Any], layer: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        return fn(layer, module, args, kwargs)

    return hook


def _restore_impl(model: Any, original: str) -> None:
    model.set_attn_implementation(original)
    if model.config._attn_implementation != original:  # pragma: no cover - defensive
        model.config._attn_implementation = original


register_runtime(TokenRetentionRuntime())
