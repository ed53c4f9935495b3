"""Tree speculative decoding at batch 1: the decode loop, and the `speculative` technique runtime.

Each step: the drafter (`policies.drafters`) proposes a token tree after the committed context; the target
verifies the pending root token (the previous step's bonus token, not yet in its cache) *and* the whole tree
in one forward (`policies.tree_attention`: 4D mask, depth positions); the longest path the target agrees
with is accepted plus one more token from the target (greedy: its argmax; sampling: the recursive-rejection
residual sample of `policies.spec_sampling`); every layer's KV cache is compacted to the accepted path.
Greedy output is token for token the target's greedy output, sampled output has exactly the target's
distribution, whatever the drafter proposes.

Policy section (`techniques.speculative`, validated by `validate_section`):

    drafter: draft_model | layer_skip | prompt_lookup | recycle
    draft_model: builtin:tiny-draft        # drafter draft_model: a causal LM sharing the target's tokenizer
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
from typing import Any

import torch

from policies.checkpoints import load_causal_lm
from policies.drafters import (
    Draft,
    Drafter,
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
DRAFTERS = ("draft_model", "layer_skip", "prompt_lookup", "recycle")
TREE_KINDS = ("static", "dynamic")
MAX_NODE_BUDGET = 512
_FIELDS = ("drafter", "draft_model", "skip_layers", "prompt_lookup", "recycle", "tree", "node_budget", "shape")
MAX_RECYCLE_K = 16
_LOOKUP_DEFAULTS = {"max_ngram": 3, "min_ngram": 1, "depth": 5, "candidates": 1}


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
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_section(section: Any, path: str = SECTION_PATH) -> list[str]:
    """Every problem of a `speculative` section, each starting with its field path (layer counts and the draft
    model's vocabulary are checked at apply time, against the model)."""
    if not isinstance(section, dict):
        return [f"{path}: must be a mapping, got {type(section).__name__}"]
    problems = [f"{path}.{k}: unknown field (known: {', '.join(_FIELDS)})" for k in section if k not in _FIELDS]
    drafter = section.get("drafter")
    if drafter not in DRAFTERS:
        problems.append(f"{path}.drafter: must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
    budget = section.get("node_budget", 64)
    if not _is_int(budget) or not 1 <= budget <= MAX_NODE_BUDGET:
        problems.append(f"{path}.node_budget: must be an integer in 1..{MAX_NODE_BUDGET}, got {budget!r}")
        budget = MAX_NODE_BUDGET
    if drafter == "draft_model" and not (isinstance(section.get("draft_model"), str) and section["draft_model"]):
        problems.append(f"{path}.draft_model: required for drafter draft_model (e.g. builtin:tiny-draft)")
    if drafter == "layer_skip":
        skip = section.get("skip_layers")
        if not isinstance(skip, list) or not skip or not all(_is_int(i) for i in skip):
            problems.append(f"{path}.skip_layers: required for drafter layer_skip: a non-empty list of layer indices")
        elif any(i < 1 for i in skip) or len(set(skip)) != len(skip):
            problems.append(f"{path}.skip_layers: indices must be distinct and >= 1 (layer 0 always runs), got {skip}")
    if drafter == "prompt_lookup":
        problems += _validate_lookup(section.get("prompt_lookup", {}), f"{path}.prompt_lookup", budget)
    elif drafter in ("draft_model", "layer_skip", "recycle"):
        problems += _validate_tree(section.get("tree"), f"{path}.tree", budget)
    if drafter == "recycle":
        problems += _validate_recycle(section, path)
        if "prompt_lookup" in section:  # recycling plus lookup, merged into one tree
            tree = section.get("tree") if isinstance(section.get("tree"), dict) else {}
            n_tree = len(tree.get("parents") or []) if isinstance(tree.get("parents"), list) else 0
            problems += _validate_lookup(section["prompt_lookup"], f"{path}.prompt_lookup", max(0, budget - n_tree))
    return problems


def _validate_lookup(lookup: Any, path: str, budget: int) -> list[str]:
    if not isinstance(lookup, dict):
        return [f"{path}: must be a mapping, got {type(lookup).__name__}"]
    problems = [f"{path}.{k}: unknown field (known: {', '.join(_LOOKUP_DEFAULTS)})" for k in lookup
                if k not in _LOOKUP_DEFAULTS]
    values = {**_LOOKUP_DEFAULTS, **lookup}
    for key in _LOOKUP_DEFAULTS:
        if not _is_int(values[key]) or values[key] < 1:
            problems.append(f"{path}.{key}: must be an integer >= 1, got {values[key]!r}")
    if not problems:
        if values["min_ngram"] > values["max_ngram"]:
            problems.append(f"{path}.min_ngram: must be <= max_ngram ({values['max_ngram']}), "
                            f"got {values['min_ngram']}")
        if values["depth"] * values["candidates"] > budget:
            problems.append(f"{path}: depth x candidates = {values['depth'] * values['candidates']} tree tokens "
                            f"exceeds node_budget {budget}")
    return problems


def _validate_recycle(section: dict[str, Any], path: str) -> list[str]:
    recycle = section.get("recycle", {})
    if not isinstance(recycle, dict) or any(k != "k" for k in recycle):
        return [f"{path}.recycle: must be a mapping with one field, k"]
    k = recycle.get("k", 8)
    if not _is_int(k) or not 1 <= k <= MAX_RECYCLE_K:
        return [f"{path}.recycle.k: must be an integer in 1..{MAX_RECYCLE_K}, got {k!r}"]
    tree = section.get("tree")
    if isinstance(tree, dict) and tree.get("kind") == "dynamic":
        return [f"{path}.tree.kind: the recycle drafter fills a static tree"]
    if isinstance(tree, dict) and isinstance(tree.get("parents"), list):
        parents = tree["parents"]
        widest = max((parents.count(p) for p in set(parents)), default=0)
        if widest > k:
            return [f"{path}.tree.parents: a node has {widest} children, more than recycle.k = {k}"]
    return []


def _validate_tree(tree: Any, path: str, budget: int) -> list[str]:
    if not isinstance(tree, dict):
        return [f"{path}: required for model drafters: a mapping with kind static (parents) or dynamic"]
    kind = tree.get("kind")
    if kind == "static":
        parents = tree.get("parents")
        if not isinstance(parents, list) or not parents:
            return [f"{path}.parents: must be a non-empty list of parent indices (-1 = the root)"]
        problems = validate_parents(parents, f"{path}.parents")
        if len(parents) > budget:
            problems.append(f"{path}.parents: {len(parents)} nodes exceed node_budget {budget}")
        extra = [k for k in tree if k not in ("kind", "parents")]
        return problems + [f"{path}.{k}: unknown field for a static tree" for k in extra]
    if kind == "dynamic":
        problems = [f"{path}.{k}: must be an integer >= 1, got {tree.get(k)!r}" for k in ("depth", "topk", "tokens")
                    if not _is_int(tree.get(k)) or tree.get(k) < 1]
        if not problems and tree["tokens"] > budget:
            problems.append(f"{path}.tokens: {tree['tokens']} nodes exceed node_budget {budget}")
        if not problems and tree["tokens"] > tree["depth"] * tree["topk"]:
            problems.append(f"{path}.tokens: at most depth x topk = {tree['depth'] * tree['topk']} nodes "
                            "can be drafted")
        extra = [k for k in tree if k not in ("kind", "depth", "topk", "tokens")]
        return problems + [f"{path}.{k}: unknown field for a dynamic tree" for k in extra]
    return [f"{path}.kind: must be one of {', '.join(TREE_KINDS)}, got {kind!r}"]


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


def make_drafter(model: Any, section: dict[str, Any]) -> Drafter:
    """The drafter a validated section describes, checked against the target `model`."""
    kind = section["drafter"]
    if kind == "prompt_lookup":
        return PromptLookupDrafter(**{**_LOOKUP_DEFAULTS, **section.get("prompt_lookup", {})})
    tree = section["tree"]
    if kind == "recycle":
        recycle = RecycleDrafter(tree["parents"], k=int(section.get("recycle", {}).get("k", 8)))
        if "prompt_lookup" not in section:
            return recycle
        return MergedDrafter(recycle, PromptLookupDrafter(**{**_LOOKUP_DEFAULTS, **section["prompt_lookup"]}))
    if kind == "draft_model":
        try:
            lm = draft_for(section["draft_model"], model)
        except ValueError as exc:  # unknown/missing checkpoint (ModelSpecError) or another tokenizer
            raise PolicyError(f"{SECTION_PATH}.draft_model: {exc}") from None
    else:
        n_layers = model.config.num_hidden_layers
        if max(section["skip_layers"]) >= n_layers or len(section["skip_layers"]) >= n_layers:
            raise PolicyError(f"{SECTION_PATH}.skip_layers: {section['skip_layers']} must name layers "
                              f"1..{n_layers - 1} and leave at least one")
        lm = LayerSkipLM(model, section["skip_layers"])
    if tree["kind"] == "static":
        return ModelDrafter(lm, tree["parents"])
    return ModelDrafter(lm, None, dynamic_depth=tree["depth"], dynamic_topk=tree["topk"],
                        dynamic_tokens=tree["tokens"])


class SpeculativeHandle(TechniqueHandle):
    """Owns generation: `generate` runs `speculative_generate` with the section's drafter. `last_stats` holds
    the statistics of the latest call."""

    def __init__(self, model: Any, section: dict[str, Any], drafter: Drafter) -> None:
        self.model = model
        self.section = section
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
        self.drafter = None  # type: ignore[assignment]  # the target was not modified; drop the draft state


class SpeculativeRuntime(TechniqueRuntime):
    """`techniques.speculative`: tree speculative decoding (see the module docstring)."""

    name = NAME
    order = 200  # owns the decode loop: applied last, sees the model as the other techniques left it
    owns_generate = True

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return validate_section(section, path)

    def apply(self, model: Any, section: dict[str, Any]) -> SpeculativeHandle:
        problems = validate_section(section)
        if problems:
            raise PolicyError(problems)
        return SpeculativeHandle(model, section, make_drafter(model, section))

    def json_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "description": "Tree speculative decoding: a drafter proposes a token tree, the target verifies it in "
                           "one forward (lossless).",
            "required": ["drafter"],
            "properties": {
                "drafter": {"enum": list(DRAFTERS)},
                "draft_model": {"type": "string", "description": "builtin:NAME or a local checkpoint"},
                "skip_layers": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "recycle": {"type": "object", "properties": {"k": {"type": "integer", "minimum": 1,
                                                                   "maximum": MAX_RECYCLE_K}}},
                "prompt_lookup": {"type": "object", "properties": {k: {"type": "integer", "minimum": 1}
                                                                   for k in _LOOKUP_DEFAULTS}},
                "tree": {"type": "object", "properties": {
                    "kind": {"enum": list(TREE_KINDS)},
                    "parents": {"type": "array", "items": {"type": "integer", "minimum": -1},
                                "description": "node i's parent (an earlier node) or -1; the j-th child of a node "
                                               "is the draft's rank-j token"},
                    "depth": {"type": "integer", "minimum": 1}, "topk": {"type": "integer", "minimum": 1},
                    "tokens": {"type": "integer", "minimum": 1}}},
                "node_budget": {"type": "integer", "minimum": 1, "maximum": MAX_NODE_BUDGET},
                "shape": {"type": "object", "description": "how the tree was chosen (provenance only)"},
            },
        }


register_runtime(SpeculativeRuntime())
