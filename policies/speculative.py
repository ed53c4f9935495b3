"""Greedy tree speculative decoding at batch 1, and the prompt-lookup drafter.

Each step: the drafter proposes a token tree (parents + tokens) from the context; the target verifies the
whole tree in one forward (`tree_attention`: 4D mask, depth positions); the longest path matching the
target's argmax is accepted plus the bonus token; every layer's KV cache is compacted to that path. The
output is token-for-token the target's greedy output (lossless), whatever the drafter proposes.

The bonus token is fed in its own forward before the next tree (simple and exact; folding it into the
next tree's root saves that forward and is left to the tuned runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from policies.tree_attention import accept_greedy, compact_cache, tree_attention_mask, tree_position_ids

Proposal = tuple[list[int], list[int]]  # (parents, tokens)
Drafter = Callable[[Sequence[int]], Proposal]


def chain(tokens: Sequence[int]) -> Proposal:
    """A chain (k drafted tokens, each the child of the previous) as a tree."""
    return list(range(-1, len(tokens) - 1)), list(tokens)


@dataclass
class PromptLookupDrafter:
    """Drafts the tokens that followed the most recent earlier occurrence of the context's last n-gram
    (largest n first), as a chain of up to `k` tokens; nothing when no n-gram recurs."""

    k: int = 5
    max_ngram: int = 3
    min_ngram: int = 1

    def __call__(self, context: Sequence[int]) -> Proposal:
        ctx = list(context)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) <= n:
                continue
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    follow = ctx[start + n:start + n + self.k]
                    if follow:
                        return chain(follow)
        return [], []


@dataclass
class SpeculativeStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_step: list[int] = field(default_factory=list)


def speculative_generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, drafter: Drafter,
                         stats: SpeculativeStats | None = None) -> torch.Tensor:
    """Greedy generation of `max_new_tokens` tokens with tree drafts verified in one forward each."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs at batch 1, got batch {input_ids.shape[0]}")
    device = input_ids.device
    stats = stats if stats is not None else SpeculativeStats()
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        root_logits = model(input_ids, past_key_values=cache, use_cache=True).logits[0, -1]
        context = input_ids[0].tolist()
        generated: list[int] = []
        while len(generated) < max_new_tokens:
            parents, tokens = drafter(context)
            n_past = cache.get_seq_length()
            if tokens:
                tree = torch.tensor([tokens], device=device)
                out = model(tree, past_key_values=cache, use_cache=True,
                            attention_mask=tree_attention_mask(parents, n_past, device=device),
                            position_ids=tree_position_ids(parents, n_past, device=device))
                accepted, bonus = accept_greedy(parents, tree[0], root_logits, out.logits[0])
                compact_cache(cache, n_past, accepted)
            else:
                accepted, bonus = [], int(root_logits.argmax())
            new = [tokens[i] for i in accepted] + [bonus]
            stats.steps += 1
            stats.drafted += len(tokens)
            stats.accepted += len(accepted)
            stats.accepted_per_step.append(len(accepted))
            generated += new
            context += new
            if len(generated) < max_new_tokens:
                step = model(torch.tensor([[bonus]], device=device), past_key_values=cache, use_cache=True)
                root_logits = step.logits[0, -1]
    return torch.cat([input_ids, torch.tensor([generated[:max_new_tokens]], device=device)], dim=1)
