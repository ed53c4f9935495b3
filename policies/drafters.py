"""Drafters for tree speculative decoding: who proposes the token tree that the target verifies.

Three kinds, one interface (`Drafter`):
- `PromptLookupDrafter`: continuations of the context's last n-gram where it occurred before (prompt lookup
  decoding, Saxena 2023); several distinct continuations are merged into a trie, so a repeated phrase with
  two different endings is one tree with two branches. No model, no cost beyond a scan of the context.
- `ModelDrafter` over a separate small model sharing the tokenizer (`builtin:tiny-draft` for `builtin:tiny`).
- `ModelDrafter` over the target itself with some decoder layers skipped (self-speculation, as in
  Draft & Verify, Zhang et al. 2023): `LayerSkipLM`. The skipped set is part of the policy.
- `EagleDrafter`: a feature-level draft head (`policies.draft_heads`, EAGLE) that reads the target's own last
  hidden states, so a model with no smaller sibling still gets a drafter that guesses well.

A model drafter grows the tree depth by depth, one draft forward per depth over the nodes that get
children (a 4D tree mask, as in verification), from either a static *shape* (the parents list of the
policy: the j-th child of a node is the draft's rank-j token, Sequoia-style) or a dynamic top-k expansion
(EAGLE-2 / SGLang-style: expand the `topk` best nodes per depth, keep the `tokens` best overall by
cumulative draft log-probability). Its own KV cache is compacted to the accepted path after each step,
exactly like the target's, so each token is drafted over once.

In sampling mode, siblings are drawn without replacement from the draft distribution and each node carries
the distribution it was drawn from (`Draft.q`), which is what lossless verification needs
(`policies.spec_sampling`). In greedy mode siblings are the draft's top-k and drafts are deterministic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from policies.tree_attention import compact_cache, node_depths, tree_attention_mask, tree_position_ids
from profilers.hf_compat import cache_arg, new_dynamic_cache


@dataclass
class Draft:
    """A proposed token tree: `parents[i]` is node i's parent (-1: child of the root, the last committed
    token); `q` (n, vocab) holds, per node, the distribution its token was drawn from (None: deterministic)."""

    parents: list[int]
    tokens: list[int]
    q: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Sampling:
    """How the target samples (temperature 0 = greedy); drafters sample their trees the same way."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Drafter(ABC):
    """Proposes a tree for the next step and learns which of its nodes were accepted."""

    def begin(self, input_ids: torch.Tensor) -> None:  # noqa: B027 - optional hook, stateless drafters skip it
        """A new sequence starts with this prompt (batch 1)."""

    @abstractmethod
    def propose(self, context: Sequence[int], sampling: Sampling, generator: torch.Generator | None) -> Draft:
        """Tree for the tokens after `context` (every committed token, the last one not yet verified)."""

    def commit(self, accepted: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """The nodes (indices into the last proposal, root to leaf) that the target accepted."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """The policy is removed: undo anything attached to the target (hooks)."""

    def observe(self, token_ids: torch.Tensor, logits: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """The target's logits (n, vocab) after each of the `token_ids` (n,) it just ran (prefill and
        verify forwards): free information about what the target predicts, for drafters that recycle it."""


# -- prompt lookup ---------------------------------------------------------------------------------------
@dataclass
class PromptLookupDrafter(Drafter):
    """Continuations (up to `depth` tokens) of the most recent earlier occurrences of the context's last
    n-gram, longest n first (`max_ngram` down to `min_ngram`); up to `candidates` distinct continuations are
    merged into a trie, most recent first (so a node's children are in recency order)."""

    depth: int = 5
    max_ngram: int = 3
    min_ngram: int = 1
    candidates: int = 1

    def propose(self, context: Sequence[int], sampling: Sampling | None = None,
                generator: torch.Generator | None = None) -> Draft:
        ctx = list(context)
        continuations: list[list[int]] = []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) <= n:
                continue
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    follow = ctx[start + n:start + n + self.depth]
                    if follow and follow not in continuations:
                        continuations.append(follow)
                        if len(continuations) >= self.candidates:
                            return trie(continuations)
            if continuations:
                break  # shorter n-grams are weaker evidence than the matches already found
        return trie(continuations)


def trie(sequences: Sequence[Sequence[int]]) -> Draft:
    """Merge token sequences into one tree (shared prefixes become shared nodes), children in first-seen order."""
    parents: list[int] = []
    tokens: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for seq in sequences:
        parent = -1
        for token in seq:
            key = (parent, int(token))
            if key not in index:
                index[key] = len(tokens)
                parents.append(parent)
                tokens.append(int(token))
            parent = index[key]
    return Draft(parents, tokens)


# -- token recycling -------------------------------------------------------------------------------------
class RecycleDrafter(Drafter):
    """Drafts from the target's own earlier predictions (Token Recycling, Luo et al. 2024): an adjacency table
    holds, for every token, the target's top-`k` next tokens the last time it ran over that token (any
    position of any prefill or verify forward, accepted or not). A static tree shape is filled from it: the
    j-th child of a node is row(node token)[j]. No draft forward at all, so it pays off wherever the target
    repeats itself.

    The table starts empty for every sequence (filled first by the prompt's prefill). The paper keeps it
    across queries; here that would let a repeated prompt draft its own earlier continuation, which flatters
    every benchmark and tuning measurement that repeats a prompt, and makes speed depend on call history."""

    def __init__(self, shape: Sequence[int], k: int = 8, vocab_size: int | None = None) -> None:
        self.shape = list(shape)
        self.k = int(k)
        self.table: dict[int, list[int]] = {}
        depths = node_depths(self.shape)
        self._order = sorted(range(len(self.shape)), key=lambda i: (depths[i], i))
        self._rank = []
        seen: dict[int, int] = {}
        for p in self.shape:
            self._rank.append(seen.get(p, 0))
            seen[p] = seen.get(p, 0) + 1
        if max(self._rank, default=0) >= self.k:
            raise ValueError(f"recycle drafter: the tree has a node with {max(self._rank) + 1} children, more "
                             f"than the {self.k} recycled candidates per token")

    def begin(self, input_ids: torch.Tensor) -> None:
        self.table = {}

    def observe(self, token_ids: torch.Tensor, logits: torch.Tensor) -> None:
        top = logits.topk(self.k, dim=-1).indices.tolist()
        for token, row in zip(token_ids.tolist(), top, strict=True):
            self.table[token] = row

    def propose(self, context: Sequence[int], sampling: Sampling | None = None,
                generator: torch.Generator | None = None) -> Draft:
        tokens: list[int | None] = [None] * len(self.shape)
        for i in self._order:  # parents come first
            p = self.shape[i]
            parent_token = context[-1] if p == -1 else tokens[p]
            row = self.table.get(parent_token) if parent_token is not None else None  # type: ignore[arg-type]
            if row is not None:
                tokens[i] = row[self._rank[i]]
        draft, _ = _pruned(self.shape, tokens, [None] * len(self.shape))
        return draft


def merge_drafts(base: Draft, extra: Draft) -> Draft:
    """`base` with `extra`'s paths added (shared prefixes become shared nodes; new nodes go after base's, so
    base's node indices are unchanged). Deterministic drafts only: a merged node has no single q row."""
    if base.q is not None or extra.q is not None:
        raise ValueError("merge_drafts: only deterministic drafts (no q rows) can be merged")
    parents, tokens = list(base.parents), list(base.tokens)
    index = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True))}
    mapped: dict[int, int] = {}
    for i, (p, t) in enumerate(zip(extra.parents, extra.tokens, strict=True)):
        parent = -1 if p == -1 else mapped[p]
        key = (parent, t)
        if key not in index:
            index[key] = len(tokens)
            parents.append(parent)
            tokens.append(t)
        mapped[i] = index[key]
    return Draft(parents, tokens)


class MergedDrafter(Drafter):
    """Two stateless deterministic drafters in one tree (e.g. token recycling plus prompt lookup): each
    step verifies both proposals in the same forward, so whichever is right on this text wins."""

    def __init__(self, base: Drafter, extra: Drafter) -> None:
        self.base, self.extra = base, extra

    def begin(self, input_ids: torch.Tensor) -> None:
        self.base.begin(input_ids)
        self.extra.begin(input_ids)

    def observe(self, token_ids: torch.Tensor, logits: torch.Tensor) -> None:
        self.base.observe(token_ids, logits)
        self.extra.observe(token_ids, logits)

    def propose(self, context: Sequence[int], sampling: Sampling | None = None,
                generator: torch.Generator | None = None) -> Draft:
        return merge_drafts(self.base.propose(context, sampling, generator),
                            self.extra.propose(context, sampling, generator))


# -- model drafters --------------------------------------------------------------------------------------
class LayerSkipLM(nn.Module):
    """The target model run with some decoder layers skipped: a draft model that costs no extra weights.

    During a call, the backbone's layer list is swapped for the kept layers (each keeps its own
    `layer_idx`, so the draft's KV cache holds entries for the kept layers only). Layer 0 must be kept:
    Hugging Face reads the cache length from it.
    """

    def __init__(self, model: nn.Module, skip: Sequence[int]) -> None:
        from profilers.model_parts import decoder_parts

        super().__init__()
        parts = decoder_parts(model)
        n = len(parts.layers)
        bad = [i for i in skip if not 0 < int(i) < n]
        if bad:
            raise ValueError(f"layer skip: indices must be in 1..{n - 1} (layer 0 is always run), got {bad}")
        self.target = model
        self.config = model.config
        self.skip = sorted({int(i) for i in skip})
        owner_path, _, attr = parts.layers_path.rpartition(".")
        self._owner = model.get_submodule(owner_path) if owner_path else model
        self._attr = attr
        self._kept = nn.ModuleList([layer for i, layer in enumerate(parts.layers) if i not in self.skip])

    @contextmanager
    def _skipping(self):
        full = getattr(self._owner, self._attr)
        setattr(self._owner, self._attr, self._kept)
        try:
            yield
        finally:
            setattr(self._owner, self._attr, full)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._skipping():
            return self.target(*args, **kwargs)


class ModelDrafter(Drafter):
    """Drafts with a causal LM (a small model, or `LayerSkipLM`) that keeps its own KV cache.

    `shape`: a static tree (parents list; the j-th child of a node is the draft's rank-j token). Or, with
    `shape=None`, a dynamic tree of `dynamic_tokens` nodes grown over `dynamic_depth` draft forwards,
    expanding the `dynamic_topk` most probable nodes per depth (EAGLE-2 style).
    """

    def __init__(self, lm: Any, shape: Sequence[int] | None = None, *, dynamic_depth: int = 5,
                 dynamic_topk: int = 4, dynamic_tokens: int = 8) -> None:
        self.lm = lm
        self.shape = None if shape is None else list(shape)
        self.dynamic = (dynamic_depth, dynamic_topk, dynamic_tokens)
        self.device = next(lm.parameters()).device
        if self.shape is not None:
            depths = node_depths(self.shape)
            self._children: dict[int, list[int]] = {}
            for i, p in enumerate(self.shape):
                self._children.setdefault(p, []).append(i)
            self._by_depth = [[i for i, d in enumerate(depths) if d == k] for k in range(max(depths, default=-1) + 1)]
        self.kv: Any = None
        self.n_cached = 0
        self._fed: dict[int, int] = {}  # node index -> position among the tree tokens fed this step
        #: greedy drafts' logits may cover a subset of the vocabulary: column j is token _scored_ids[j]
        self._scored_ids: torch.Tensor | None = None

    # -- sequence state ---------------------------------------------------------------------------------
    def begin(self, input_ids: torch.Tensor) -> None:
        self.kv = new_dynamic_cache(self.lm.config)
        self.n_cached = 0
        self._fed = {}

    def commit(self, accepted: Sequence[int]) -> None:
        """Keep the draft cache's committed part plus the accepted nodes it has already run over."""
        fed_path = [self._fed[node] for node in accepted if node in self._fed]
        compact_cache(self.kv, self.n_cached, fed_path)
        self.n_cached += len(fed_path)
        self._fed = {}

    # -- drafting -------------------------------------------------------------------------------------------
    def _forward(self, tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
        """Logits (n, vocab) of `tokens` appended to the cache; `parents` over all tree tokens fed so far
        this step (the new ones last) gives the tree mask, None means a plain chain."""
        ids = torch.tensor([tokens], device=self.device)
        kwargs: dict[str, Any] = {**cache_arg(self.lm, self.kv), "use_cache": True}
        if parents is not None:
            mask = tree_attention_mask(parents, self.n_cached, device=self.device)
            kwargs["attention_mask"] = mask[:, :, -len(tokens):]
            kwargs["position_ids"] = tree_position_ids(parents, self.n_cached, device=self.device)[:, -len(tokens):]
        return self.lm(ids, **kwargs).logits[0].float()

    def propose(self, context: Sequence[int], sampling: Sampling, generator: torch.Generator | None) -> Draft:
        pending = list(context[self.n_cached:])
        root_logits = self._forward(pending)[-1]
        self.n_cached += len(pending)
        if self.shape is not None:
            return self._static(root_logits, sampling, generator)
        return self._dynamic(root_logits, sampling, generator)

    def _children_of(self, logits: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
                     ) -> tuple[list[int], list[float] | None, list[torch.Tensor] | None]:
        """k child tokens with their draft log-probabilities: the top-k (greedy); or k draws without replacement
        with each draw's distribution (and no log-probabilities: a sampled tree ranks by sibling order)."""
        if sampling.greedy:
            top = logits.topk(k)
            ids = top.indices if self._scored_ids is None else self._scored_ids[top.indices]
            return ids.tolist(), (top.values - torch.logsumexp(logits, -1)).tolist(), None
        from policies.spec_sampling import sampling_probs

        q = sampling_probs(logits, sampling.temperature, sampling.top_p)
        tokens, rows = [], []
        for _ in range(k):
            total = float(q.sum())
            if total <= 0:
                break
            q = q / total
            token = int(torch.multinomial(q, 1, generator=generator))
            tokens.append(token)
            rows.append(q.clone())
            q = q.clone()
            q[token] = 0
        return tokens, None, rows

    def _static(self, root_logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> Draft:
        shape = self.shape or []
        tokens: list[int | None] = [None] * len(shape)
        rows: list[torch.Tensor | None] = [None] * len(shape)
        fed_nodes: list[int] = []
        logits_of: dict[int, torch.Tensor] = {-1: root_logits}
        for depth, level in enumerate(self._by_depth):
            for parent in sorted({shape[i] for i in level}):
                if parent not in logits_of:
                    continue  # the parent got no token (sampling ran out of draft mass)
                kids = self._children[parent]
                picked, _, q_rows = self._children_of(logits_of[parent], len(kids), sampling, generator)
                for j, child in enumerate(kids[:len(picked)]):
                    tokens[child] = picked[j]
                    if q_rows is not None:
                        rows[child] = q_rows[j]
            expand = [i for i in level if i in self._children and tokens[i] is not None]
            if not expand or depth + 1 >= len(self._by_depth):
                break
            fed_nodes += expand
            out = self._forward([tokens[i] for i in expand], self._fed_parents(fed_nodes, shape))
            for i, row in zip(expand, out[-len(expand):], strict=True):
                logits_of[i] = row
        draft, remap = _pruned(shape, tokens, rows)
        self._fed = {remap[node]: pos for pos, node in enumerate(fed_nodes)}
        return draft

    @staticmethod
    def _fed_parents(fed_nodes: list[int], parents: Sequence[int]) -> list[int]:
        """Parents of the fed nodes re-indexed among the fed nodes (a fed node's parent was fed before it)."""
        pos = {node: k for k, node in enumerate(fed_nodes)}
        return [-1 if parents[node] == -1 else pos[parents[node]] for node in fed_nodes]

    def _dynamic(self, root_logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> Draft:
        depth_limit, topk, budget = self.dynamic
        parents: list[int] = []
        tokens: list[int] = []
        scores: list[float] = []
        rows: list[torch.Tensor | None] = []
        frontier: list[tuple[int, torch.Tensor]] = [(-1, root_logits)]
        fed_nodes: list[int] = []
        for depth in range(depth_limit):
            new: list[int] = []
            for parent, logits in frontier:
                base = 0.0 if parent == -1 else scores[parent]
                picked, logps, q_rows = self._children_of(logits, topk, sampling, generator)
                for j, token in enumerate(picked):
                    parents.append(parent)
                    tokens.append(token)
                    # Sampling: which nodes exist may not depend on their own sampled token (that would bias
                    # verification), so a node ranks by its parent's score and its sibling rank only.
                    own = logps[j] if logps is not None else -1e-3 * (j + 1)
                    scores.append(base + own)
                    rows.append(None if q_rows is None else q_rows[j])
                    new.append(len(tokens) - 1)
            if depth + 1 >= depth_limit:
                break
            expand = sorted(sorted(new, key=lambda i: -scores[i])[:topk])
            fed_nodes += expand
            out = self._forward([tokens[i] for i in expand], self._fed_parents(fed_nodes, parents))
            frontier = list(zip(expand, out[-len(expand):], strict=True))
        keep = _best_subtree(parents, scores, budget)
        fed_pos = {node: k for k, node in enumerate(fed_nodes)}
        remap = {old: new for new, old in enumerate(keep)}
        self._fed = {remap[node]: pos for node, pos in fed_pos.items() if node in remap}
        q = None if sampling.greedy else torch.stack([rows[i] for i in keep]) if keep else None  # type: ignore[misc]
        return Draft([-1 if parents[i] == -1 else remap[parents[i]] for i in keep], [tokens[i] for i in keep], q)


def _best_subtree(parents: list[int], scores: list[float], budget: int) -> list[int]:
    """The `budget` nodes of highest cumulative score that form a tree (a node only with its parent),
    returned in an order where parents come first (depth, then score)."""
    chosen: set[int] = set()
    for i in sorted(range(len(parents)), key=lambda i: -scores[i]):
        if len(chosen) >= budget:
            break
        if parents[i] == -1 or parents[i] in chosen:
            chosen.add(i)
    depth = node_depths(parents)
    return sorted(chosen, key=lambda i: (depth[i], i))


def _pruned(shape: Sequence[int], tokens: list[int | None],
            rows: list[torch.Tensor | None]) -> tuple[Draft, dict[int, int]]:
    """Drop the nodes that got no token (sampling ran out of draft mass; their descendants got none either);
    also returns the map from shape index to draft index."""
    keep = [i for i, t in enumerate(tokens) if t is not None]
    remap = {old: new for new, old in enumerate(keep)}
    parents = [-1 if shape[i] == -1 else remap[shape[i]] for i in keep]
    q = None
    if keep and rows[keep[0]] is not None:
        q = torch.stack([rows[i] for i in keep])  # type: ignore[misc]
    return Draft(parents, [int(tokens[i]) for i in keep], q), remap  # type: ignore[arg-type]


# -- feature-level draft head (EAGLE) ------------------------------------------------------------------------
class EagleDrafter(ModelDrafter):
    """Drafts with an EAGLE head over the target's features, on a static or dynamic tree like `ModelDrafter`.

    The head pairs the target's feature f_t with token t+1. A forward hook on the target's final norm catches
    the features of every target forward (prefill and verify); after a verify, the features of the root and
    the accepted nodes become the next step's context pairs, and the head's tree entries are dropped: as in
    EAGLE, the accepted path is re-run with the target's true features rather than kept with the head's guesses.
    Tree node y's pair is (the head's output at y's parent, y); depth-d nodes sit at position L + d.

    With token retention at prefill the target returns only the kept rows; the head then starts from the last
    prompt position (its cache has a gap there, positions stay absolute)."""

    def __init__(self, target: Any, head: Any, shape: Sequence[int] | None = None, *, dynamic_depth: int = 5,
                 dynamic_topk: int = 4, dynamic_tokens: int = 8, vocab_size: int | None = None) -> None:
        from policies.draft_heads import DraftVocabulary, Eagle3Head, HeadFormatError
        from profilers.model_parts import decoder_parts

        super().__init__(head, shape, dynamic_depth=dynamic_depth, dynamic_topk=dynamic_topk,
                         dynamic_tokens=dynamic_tokens)
        parts = decoder_parts(target)
        self.head = head
        self.embed = parts.embed
        self._own_logits = isinstance(head, Eagle3Head)  # EAGLE-3: its own LM head over its draft vocabulary
        if self._own_logits and vocab_size is not None:
            raise HeadFormatError("an EAGLE-3 head scores its own draft vocabulary (d2t); set vocab: null")
        self.vocab = None if self._own_logits else DraftVocabulary.build(parts.lm_head, head.vocab_rank, vocab_size)
        # a greedy draft ranks the scored tokens only, so their full-vocabulary logits are never built
        self._scored_ids = head.draft_to_target if self._own_logits else self.vocab.ids
        self._greedy = True
        self._captured: list[torch.Tensor] = []
        if head.tap_layers is None:  # EAGLE-1/2: the final norm's output
            self._taps = [parts.norm.register_forward_hook(self._capture_output)]
        else:  # EAGLE-3: the inputs of a few decoder layers, low to high
            self._taps = [parts.layers[i].register_forward_pre_hook(self._capture_input, with_kwargs=True)
                          for i in head.tap_layers]
        self._begin_state(0)

    def _capture_output(self, module: Any, args: Any, output: Any) -> None:
        self._captured = [output if isinstance(output, torch.Tensor) else output[0]]

    def _capture_input(self, module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if len(self._captured) == len(self._taps):  # a new forward
            self._captured = []
        self._captured.append(hidden)

    def close(self) -> None:
        for tap in self._taps:
            tap.remove()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits of `hidden` (n, H): over the scored tokens only when drafting greedily (`_children_of`
        maps ranks to target ids), else over the target's whole vocabulary (-inf off the draft vocabulary), as
        sampled drafts need their distributions there."""
        compact = self._greedy and self._scored_ids is not None
        if self._own_logits:
            return self.head.scored_logits(hidden) if compact else self.head.logits(hidden)
        return self.vocab.scored_logits(hidden) if compact else self.vocab.logits(hidden)

    def _begin_state(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.next_pos = 0  # position of the first feature not yet run through the head
        self.pending: torch.Tensor | None = None  # (n, H): features at next_pos, next_pos + 1, ...
        self._verify_rows: torch.Tensor | None = None
        self._root_hidden: torch.Tensor | None = None
        self._fed_hidden: list[torch.Tensor] = []

    def begin(self, input_ids: torch.Tensor) -> None:
        super().begin(input_ids)
        self._begin_state(int(input_ids.shape[-1]))

    def observe(self, token_ids: torch.Tensor, logits: torch.Tensor) -> None:
        if len(self._captured) != len(self._taps):
            raise RuntimeError("eagle drafter: the target's forward did not pass the head's feature taps")
        n = len(token_ids)  # each tap's last n rows (after token retention, deeper layers hold fewer)
        rows = torch.cat([c[0, -n:] for c in self._captured], dim=-1)
        self._captured = []
        self.observe_features(rows)

    def observe_features(self, rows: torch.Tensor) -> None:
        """The target's features (n, H) of the forward it just ran: after `begin`, the prompt's (or its last
        rows'); after a proposal, the verify forward's ([root] + tree nodes), which `commit` selects from.
        Called by `observe`; a simulation that knows the features already calls it directly."""
        if self.pending is None and self.n_cached == 0:  # the prefill: features of the prompt (or its last row)
            self.pending = rows
            self.next_pos = self.prompt_len - len(rows)
        else:
            self._verify_rows = rows

    def commit(self, accepted: Sequence[int]) -> None:
        compact_cache(self.kv, self.n_cached, [])  # drop the tree: the accepted path re-runs with true features
        rows = self._verify_rows
        if rows is None:
            return
        index = torch.tensor([0] + [i + 1 for i in accepted], device=rows.device)
        self.pending = rows.index_select(0, index)
        self._verify_rows = None

    def _run(self, features: torch.Tensor, tokens: list[int], positions: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        return self.head(features[None], self.embed(ids), self.kv, attention_mask=mask, position_ids=positions)[0]

    def propose(self, context: Sequence[int], sampling: Sampling, generator: torch.Generator | None) -> Draft:
        last = len(context) - 1  # context[last] is committed but not yet verified: the root
        if self.pending is None or self.next_pos + len(self.pending) != last:
            raise RuntimeError(f"eagle drafter: features cover positions {self.next_pos}.."
                               f"{self.next_pos + (0 if self.pending is None else len(self.pending)) - 1}, the "
                               f"context needs up to {last - 1}")
        n = len(self.pending)
        positions = torch.arange(self.next_pos, last, device=self.device)[None]
        mask = None
        if self.n_cached != self.next_pos:  # a gap (token retention): causal over the cache by an explicit mask
            mask = torch.zeros(1, 1, n, self.n_cached + n, dtype=self.pending.dtype, device=self.device)
            mask[..., self.n_cached:] = torch.triu(torch.full((n, n), torch.finfo(mask.dtype).min,
                                                              device=self.device), 1)
        hidden = self._run(self.pending, list(context[self.next_pos + 1:last + 1]), positions, mask)
        self.n_cached += n
        self.next_pos = last
        self.pending = None
        self._root_hidden = hidden[-1]
        self._fed_hidden = []
        self._greedy = sampling.greedy
        root_logits = self._logits(hidden[-1:])[0]
        if self.shape is not None:
            return self._static(root_logits, sampling, generator)
        return self._dynamic(root_logits, sampling, generator)

    def _forward(self, tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
        """Logits of tree nodes `tokens` (the last fed nodes; `parents` over every node fed this step)."""
        assert parents is not None, "the eagle drafter feeds tree nodes only through _forward"
        new_parents = parents[-len(tokens):]
        features = torch.stack([self._root_hidden if p == -1 else self._fed_hidden[p] for p in new_parents])
        mask = tree_attention_mask(parents, self.n_cached, dtype=features.dtype, device=self.device)
        mask = mask[:, :, -len(tokens):]
        positions = tree_position_ids(parents, self.next_pos, device=self.device)[:, -len(tokens):]
        hidden = self._run(features, tokens, positions, mask)
        self._fed_hidden.extend(hidden.unbind(0))
        return self._logits(hidden)
