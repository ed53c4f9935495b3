"""Tree speculative decoding at batch 1: the decode loop, and the `speculative` technique runtime.

Each step: the drafter (`policies.drafters`) proposes a token tree after the committed context; the target
verifies the pending root token (the previous step's bonus token, not yet in its cache) *and* the whole tree
in one forward (`policies.tree_attention`: 4D mask, depth positions); the longest path the target agrees
with is accepted plus one more token from the target (greedy: its argmax; sampling: the recursive-rejection
residual sample of `policies.spec_sampling`); every layer's KV cache is compacted to the accepted path.
Greedy output is token for token the target's greedy output, sampled output has exactly the target's
distribution, whatever the drafter proposes.

Policy section (`techniques.speculative`, described by `SpeculativeConfig`):

    drafter: draft_model | layer_skip | prompt_lookup | recycle | eagle
    draft_model: builtin:tiny-draft        # drafter draft_model: a causal LM sharing the target's tokenizer
    eagle: {head: builtin:smollm2-135m-eagle, vocab: 8192}   # drafter eagle: a feature-level draft head
                                           # (policies.draft_heads); vocab: score the 8192 most frequent
                                           # tokens only (FR-Spec), null: the whole vocabulary
    skip_layers: [2, 3]                    # drafter layer_skip: target layers the draft skips (never 0)
    prompt_lookup: {max_ngram: 3, min_ngram: 1, depth: 5, candidates: 2}   # drafter prompt_lookup
    recycle: {k: 8}                        # drafter recycle: the target's top-k per token, recycled
                                           # (with a prompt_lookup mapping too: both merged in one tree)
    tree: {kind: static, parents: [-1, -1, 0, 0, 2]}    # model/recycle drafters; j-th child = rank j
    tree: {kind: dynamic, depth: 5, topk: 4, tokens: 8} # EAGLE-2-style dynamic tree
    node_budget: 64                        # most tree tokens per verify forward
    shape: {...}                           # optional provenance (how the tree was chosen); not read

The runtime owns the decode loop (order 200): other techniques (token retention at prefill) are applied
before it and act inside its forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from policies.checkpoints import load_causal_lm
from policies.config import (
    Choice,
    Int,
    ListOf,
    Mapping,
    Nullable,
    Section,
    Tagged,
    TechniqueConfig,
    Text,
    option,
    required,
)
from policies.drafters import (
    Draft,
    Drafter,
    EagleDrafter,
    LayerSkipLM,
    MergedDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    RecycleDrafter,
    Sampling,
)
from policies.registry import DecodeStats, TechniqueHandle, TechniqueRuntime, register_runtime
from policies.schema import PolicyError
from policies.tree_attention import (
    accept_greedy,
    compact_cache,
    node_depths,
    tree_attention_mask,
    tree_position_ids,
    validate_parents,
)
from profilers.hf_compat import cache_arg, new_dynamic_cache

NAME = "speculative"
SECTION_PATH = f"techniques.{NAME}"
DRAFTERS = ("draft_model", "layer_skip", "prompt_lookup", "recycle", "eagle")
TREE_KINDS = ("static", "dynamic")
MAX_NODE_BUDGET = 512
MAX_RECYCLE_K = 16
MODEL_DRAFTERS = ("draft_model", "layer_skip", "recycle", "eagle")  # the drafters that fill a tree


@dataclass
class SpeculativeStats(DecodeStats):
    """What the loop did: steps, drafted and accepted tokens (per step), for reports and tuning."""

    report_key = "speculative"

    steps: int = 0
    drafted: int = 0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_step)

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per verify step (each step also yields one target token)."""
        return self.accepted / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted}


def chain(tokens: Sequence[int]) -> Draft:
    """A chain (k drafted tokens, each the child of the previous) as a tree."""
    return Draft(list(range(-1, len(tokens) - 1)), [int(t) for t in tokens])


def _verify_inputs(root: int, draft: Draft, n_past: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, 4D mask and positions for [root] + tree: the root is node 0, the tree's -1 parents point to it."""
    parents = [-1] + [p + 1 for p in draft.parents]
    ids = torch.tensor([[root] + draft.tokens], device=device)
    return (ids, tree_attention_mask(parents, n_past, dtype=dtype, device=device),
            tree_position_ids(parents, n_past, device=device))


def _suppress_eos(logits: torch.Tensor, first_index: int, parents: Sequence[int], min_new: int,
                  eos: Sequence[int]) -> None:
    """Like HF's min_new_tokens: no EOS where the row's token would be generated token number < min_new
    (row 0 is the root, the others the tree nodes of `parents`)."""
    if not eos or first_index >= min_new:
        return
    rows = [0] + [d + 1 for d in node_depths(parents)]
    for r, offset in enumerate(rows):
        if first_index + offset < min_new:
            logits[r, list(eos)] = -float("inf")


def speculative_generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, drafter: Drafter, *,
                         sampling: Sampling | None = None, generator: torch.Generator | None = None,
                         min_new_tokens: int = 0, eos_token_id: int | Sequence[int] | None = None,
                         stats: SpeculativeStats | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens after `input_ids` (batch 1); returns prompt + new tokens."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs at batch 1, got input of shape {tuple(input_ids.shape)}")
    sampling = sampling or Sampling()
    stats = stats if stats is not None else SpeculativeStats()
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = new_dynamic_cache(model.config)
    generated: list[int] = []
    with torch.inference_mode():
        drafter.begin(input_ids)
        prefill = model(input_ids, **cache_arg(model, cache), use_cache=True).logits
        if prefill.shape[1] == input_ids.shape[1]:  # token retention returns fewer rows: the last is the prompt's
            drafter.observe(input_ids[0], prefill[0])
        else:
            drafter.observe(input_ids[0, -1:], prefill[0, -1:])
        logits = prefill[:, -1].float()
        _suppress_eos(logits, 0, [], min_new_tokens, eos)
        generated.append(_pick(logits[0], sampling, generator))
        context = input_ids[0].tolist() + generated
        while len(generated) < max_new_tokens and not (eos and generated[-1] in eos):
            draft = drafter.propose(context, sampling, generator)
            n_past = cache.get_seq_length()
            ids, mask, positions = _verify_inputs(context[-1], draft, n_past, device, dtype)
            out = model(ids, **cache_arg(model, cache), use_cache=True, attention_mask=mask, position_ids=positions)
            rows = out.logits[0].float()
            drafter.observe(ids[0], rows)
            _suppress_eos(rows, len(generated), draft.parents, min_new_tokens, eos)
            accepted, bonus = _accept(draft, rows, sampling, generator)
            compact_cache(cache, n_past, [0] + [i + 1 for i in accepted])
            drafter.commit(accepted)
            new = [draft.tokens[i] for i in accepted] + [bonus]
            stats.steps += 1
            stats.drafted += len(draft)
            stats.accepted_per_step.append(len(accepted))
            if eos:
                stop = next((k for k, t in enumerate(new) if t in eos), None)
                new = new if stop is None else new[:stop + 1]
            generated += new
            context += new
    return torch.cat([input_ids, torch.tensor([generated[:max_new_tokens]], device=device)], dim=1)


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    from policies.spec_sampling import sampling_probs

    return int(torch.multinomial(sampling_probs(logits, sampling.temperature, sampling.top_p), 1, generator=generator))


def _accept(draft: Draft, rows: torch.Tensor, sampling: Sampling,
            generator: torch.Generator | None) -> tuple[list[int], int]:
    """Accepted node indices (path order) and the target's own next token, from the verify logits."""
    tokens = torch.tensor(draft.tokens, dtype=torch.long)
    if sampling.greedy:
        return accept_greedy(draft.parents, tokens, rows[0], rows[1:])
    from policies.spec_sampling import accept_sampling, sampling_probs

    probs = sampling_probs(rows, sampling.temperature, sampling.top_p)
    return accept_sampling(draft.parents, tokens, probs[0], probs[1:], draft.q, generator=generator)


# -- policy section --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PromptLookupConfig(TechniqueConfig):
    """`prompt_lookup`: draft continuations of the longest suffix n-gram found earlier in the context."""

    max_ngram: int = option(3, Int(min=1), "longest suffix n-gram looked up")
    min_ngram: int = option(1, Int(min=1), "shortest suffix n-gram looked up")
    depth: int = option(5, Int(min=1), "tokens drafted per continuation")
    candidates: int = option(1, Int(min=1), "continuations drafted (one chain each)")

    def drafter(self) -> PromptLookupDrafter:
        return PromptLookupDrafter(max_ngram=self.max_ngram, min_ngram=self.min_ngram, depth=self.depth,
                                   candidates=self.candidates)

    def check(self, path: str) -> list[str]:
        if self.min_ngram > self.max_ngram:
            return [f"{path}.min_ngram: must be <= max_ngram ({self.max_ngram}), got {self.min_ngram}"]
        return []


@dataclass(frozen=True, kw_only=True)
class RecycleConfig(TechniqueConfig):
    """`recycle`: the target's own top-k next tokens of every token seen, recycled as drafts."""

    k: int = option(8, Int(min=1, max=MAX_RECYCLE_K), "candidates kept per token")


@dataclass(frozen=True, kw_only=True)
class EagleConfig(TechniqueConfig):
    """`eagle`: the draft head, and how much of the vocabulary it scores."""

    head: str = required(Text(), "the head: builtin:NAME or a local directory in EAGLE-1/2's layout")
    vocab: int | None = option(None, Nullable(Int(min=1)), "score only this many most frequent tokens (FR-Spec); "
                               "null: every token")


@dataclass(frozen=True, kw_only=True)
class StaticTree(TechniqueConfig):
    """A fixed tree shape: node i's parent, the j-th child of a node being the draft's rank-j token."""

    kind: str = required(Choice(("static",)), "static")
    parents: tuple[int, ...] = required(ListOf(Int(min=-1), min_items=1, what="a non-empty list of parent "
                                                "indices (-1 = the root)"),
                                        "node i's parent (an earlier node) or -1; the j-th child of a node is the "
                                        "draft's rank-j token")

    def check(self, path: str) -> list[str]:
        return validate_parents(list(self.parents), f"{path}.parents")


@dataclass(frozen=True, kw_only=True)
class DynamicTree(TechniqueConfig):
    """EAGLE-2-style tree: expand the top-k children of the most confident nodes, keep the best `tokens`."""

    kind: str = required(Choice(("dynamic",)), "dynamic")
    depth: int = required(Int(min=1), "draft steps")
    topk: int = required(Int(min=1), "children tried per expanded node")
    tokens: int = required(Int(min=1), "nodes kept for the verify forward")

    @property
    def candidates(self) -> int:
        """Nodes the expansion drafts before the best `tokens` are kept: top-k children of the root, then of
        the top-k best new nodes at each further depth."""
        return self.topk + (self.depth - 1) * self.topk * self.topk

    def check(self, path: str) -> list[str]:
        if self.tokens > self.candidates:
            return [f"{path}.tokens: at most topk + (depth - 1) x topk^2 = {self.candidates} nodes can be drafted"]
        return []


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig(TechniqueConfig):
    """`techniques.speculative` (see the module docstring). Layer counts and the draft model's vocabulary are
    checked at apply time, against the model."""

    technique: ClassVar[str] = NAME
    description: ClassVar[str] = ("Tree speculative decoding: a drafter proposes a token tree, the target verifies "
                                  "it in one forward (lossless).")

    drafter: str = required(Choice(DRAFTERS), "who proposes the draft tokens")
    draft_model: str | None = option(None, Nullable(Text()), "drafter draft_model: builtin:NAME or a local "
                                     "checkpoint sharing the target's tokenizer")
    skip_layers: tuple[int, ...] | None = option(
        None, Nullable(ListOf(Int(min=1), min_items=1)), "drafter layer_skip: target layers the draft skips "
        "(layer 0 always runs)")
    prompt_lookup: PromptLookupConfig | None = option(
        None, Nullable(Section(PromptLookupConfig)), "drafter prompt_lookup (or with recycle: merged into its tree)")
    recycle: RecycleConfig | None = option(None, Nullable(Section(RecycleConfig)), "drafter recycle")
    eagle: EagleConfig | None = option(None, Nullable(Section(EagleConfig)), "drafter eagle")
    tree: StaticTree | DynamicTree | None = option(
        None, Nullable(Tagged("kind", {"static": StaticTree, "dynamic": DynamicTree})),
        "the tree a model drafter fills: static (parents) or dynamic")
    node_budget: int = option(64, Int(min=1, max=MAX_NODE_BUDGET), "most tree tokens per verify forward")
    shape: dict[str, Any] | None = option(None, Nullable(Mapping()), "how the tree was chosen (provenance only; "
                                          "not read)")

    @property
    def lookup(self) -> PromptLookupConfig:
        """The prompt-lookup settings, defaults when the section has none."""
        return self.prompt_lookup or PromptLookupConfig()

    def check(self, path: str) -> list[str]:
        problems: list[str] = []
        budget, tree = self.node_budget, self.tree
        if self.drafter == "draft_model" and not self.draft_model:
            problems.append(f"{path}.draft_model: required for drafter draft_model (e.g. builtin:tiny-draft)")
        if self.drafter == "eagle" and self.eagle is None:
            problems.append(f"{path}.eagle: required for drafter eagle: a mapping with head (builtin:NAME or a "
                            "directory)")
        if self.drafter == "layer_skip":
            if not self.skip_layers:
                problems.append(f"{path}.skip_layers: required for drafter layer_skip: a non-empty list of layer "
                                "indices")
            elif len(set(self.skip_layers)) != len(self.skip_layers):
                problems.append(f"{path}.skip_layers: indices must be distinct and >= 1 (layer 0 always runs), "
                                f"got {list(self.skip_layers)}")
        if self.drafter == "prompt_lookup":
            problems += _lookup_budget(self.lookup, f"{path}.prompt_lookup", budget)
            return problems
        if tree is None:
            return problems + [f"{path}.tree: required for model drafters: a mapping with kind static (parents) or "
                               "dynamic"]
        n_tree = len(tree.parents) if isinstance(tree, StaticTree) else tree.tokens
        if n_tree > budget:
            field = "parents" if isinstance(tree, StaticTree) else "tokens"
            problems.append(f"{path}.tree.{field}: {n_tree} nodes exceed node_budget {budget}")
        if self.drafter == "recycle":
            k = (self.recycle or RecycleConfig()).k
            if isinstance(tree, DynamicTree):
                problems.append(f"{path}.tree.kind: the recycle drafter fills a static tree")
            else:
                widest = max(tree.parents.count(p) for p in set(tree.parents))
                if widest > k:
                    problems.append(f"{path}.tree.parents: a node has {widest} children, more than recycle.k = {k}")
            if self.prompt_lookup is not None:  # recycling plus lookup, merged into one tree
                problems += _lookup_budget(self.prompt_lookup, f"{path}.prompt_lookup", max(0, budget - n_tree))
        return problems


def _lookup_budget(lookup: PromptLookupConfig, path: str, budget: int) -> list[str]:
    n = lookup.depth * lookup.candidates
    return [f"{path}: depth x candidates = {n} tree tokens exceeds node_budget {budget}"] if n > budget else []


# -- runtime ---------------------------------------------------------------------------------------------------
_DRAFT_MODELS: dict[tuple[str, str], Any] = {}


def load_draft_model(spec: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The draft model `spec` (builtin:NAME or a local checkpoint), loaded once per process, device and dtype."""
    key = (spec, str(device), str(dtype))
    if key not in _DRAFT_MODELS:
        _DRAFT_MODELS[key] = load_causal_lm(spec, device, dtype)
    return _DRAFT_MODELS[key]


def draft_for(spec: str, target: Any) -> Any:
    """The draft model `spec` on `target`'s device and in its dtype, checked to share its vocabulary
    (ValueError otherwise)."""
    weight = next(target.parameters())
    draft = load_draft_model(spec, weight.device, weight.dtype)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft model {spec} has vocabulary {draft.config.vocab_size}, the target "
                         f"{target.config.vocab_size}: not the same tokenizer")
    return draft


_HEADS: dict[tuple[str, str, str], Any] = {}


def load_draft_head(spec: str, target: Any) -> Any:
    """The draft head `spec` names for `target`, loaded once per process, device and dtype."""
    from policies.checkpoints import resolve_checkpoint
    from policies.draft_heads import load_head

    weight = next(target.parameters())
    key = (spec, str(weight.device), str(weight.dtype))
    if key not in _HEADS:
        _HEADS[key] = load_head(resolve_checkpoint(spec), target)
    return _HEADS[key]


def make_drafter(model: Any, config: SpeculativeConfig) -> Drafter:
    """The drafter a config describes, checked against the target `model`."""
    kind, tree = config.drafter, config.tree
    lookup = config.lookup
    if kind == "prompt_lookup":
        return lookup.drafter()
    assert tree is not None  # checked by SpeculativeConfig.check
    if kind == "recycle":
        recycle = RecycleDrafter(list(tree.parents), k=(config.recycle or RecycleConfig()).k)
        if config.prompt_lookup is None:
            return recycle
        return MergedDrafter(recycle, lookup.drafter())
    if kind == "eagle":
        from policies.checkpoints import CheckpointError
        from policies.draft_heads import HeadFormatError

        eagle = config.eagle
        assert eagle is not None  # checked by SpeculativeConfig.check
        try:
            head = load_draft_head(eagle.head, model)
            kwargs: dict[str, Any] = {"vocab_size": eagle.vocab}
            if isinstance(tree, StaticTree):
                return EagleDrafter(model, head, list(tree.parents), **kwargs)
            return EagleDrafter(model, head, None, dynamic_depth=tree.depth, dynamic_topk=tree.topk,
                                dynamic_tokens=tree.tokens, **kwargs)
        except (CheckpointError, HeadFormatError) as exc:
            raise PolicyError(f"{SECTION_PATH}.eagle: {exc}") from None
    if kind == "draft_model":
        try:
            lm = draft_for(str(config.draft_model), model)
        except ValueError as exc:  # unknown/missing checkpoint or another tokenizer
            raise PolicyError(f"{SECTION_PATH}.draft_model: {exc}") from None
    else:
        skip = list(config.skip_layers or ())
        n_layers = model.config.num_hidden_layers
        if max(skip) >= n_layers or len(skip) >= n_layers:
            raise PolicyError(f"{SECTION_PATH}.skip_layers: {skip} must name layers 1..{n_layers - 1} and leave at "
                              "least one")
        lm = LayerSkipLM(model, skip)
    if isinstance(tree, StaticTree):
        return ModelDrafter(lm, list(tree.parents))
    return ModelDrafter(lm, None, dynamic_depth=tree.depth, dynamic_topk=tree.topk, dynamic_tokens=tree.tokens)


class SpeculativeHandle(TechniqueHandle):
    """Owns generation: `generate` runs `speculative_generate` with the section's drafter. `last_stats` holds
    the statistics of the latest call."""

    def __init__(self, model: Any, config: SpeculativeConfig, drafter: Drafter) -> None:
        self.model = model
        self.config = config
        self.drafter = drafter
        self.last_stats = SpeculativeStats()

    def generate(self, model: Any, input_ids: Any = None, **kwargs: Any) -> torch.Tensor:
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("speculative generate needs input_ids")
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):
            raise ValueError("speculative decoding runs one unpadded sequence at a time (batch 1, no padding)")
        config = getattr(model, "generation_config", None)
        max_new = kwargs.pop("max_new_tokens", None) or getattr(config, "max_new_tokens", None) or 20
        sampling = Sampling()
        if kwargs.pop("do_sample", False):
            sampling = Sampling(float(kwargs.pop("temperature", None) or 1.0), float(kwargs.pop("top_p", None) or 1.0))
        generator = kwargs.pop("generator", None)
        eos = kwargs.pop("eos_token_id", getattr(config, "eos_token_id", None))
        min_new = int(kwargs.pop("min_new_tokens", None) or 0)
        for ignored in ("pad_token_id", "temperature", "top_p", "top_k", "use_cache", "return_dict_in_generate"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise ValueError(f"speculative generate: unsupported arguments {', '.join(sorted(kwargs))}")
        self.last_stats = SpeculativeStats()
        return speculative_generate(model, input_ids, int(max_new), self.drafter, sampling=sampling,
                                    generator=generator, min_new_tokens=min_new, eos_token_id=eos,
                                    stats=self.last_stats)

    def remove(self) -> None:
        if self.drafter is not None:
            self.drafter.close()  # a drafter's hooks on the target (eagle) go; nothing else was modified
        self.drafter = None  # type: ignore[assignment]


class SpeculativeRuntime(TechniqueRuntime):
    """`techniques.speculative`: tree speculative decoding (see the module docstring)."""

    name = NAME
    config_class = SpeculativeConfig
    order = 200  # owns the decode loop: applied last, sees the model as the other techniques left it
    owns_generate = True

    def apply(self, model: Any, config: SpeculativeConfig | dict[str, Any]) -> SpeculativeHandle:
        config = self.config_of(config)
        return SpeculativeHandle(model, config, make_drafter(model, config))


register_runtime(SpeculativeRuntime())
