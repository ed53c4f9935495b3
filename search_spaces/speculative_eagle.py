"""The EAGLE drafter's cost model: its tokens per step and its draft time, measured by running it.

A dynamic tree's acceptance cannot be read off a positional acceptance vector (which nodes exist depends on
the head's confidence at every step), so it is simulated exactly instead: the real `EagleDrafter` drafts after
each prefix of the target's greedy continuations (`calibration_sequences`), fed the target's true features
(one teacher-forced pass per sequence, as the verify forward would give them), and the greedy path it would
have had accepted is walked. Greedy acceptance depends only on the target's continuation, so the tokens per
step are those of the real decode loop; the drafting is timed as it runs (head forwards, the draft vocabulary's
LM-head rows, tree building: everything but the verify forward, which the verify curve prices).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class EagleSimulation:
    """Per verify step: mean tokens (accepted + 1), mean tree size, median drafting ms; and the head's own
    prefill over a prompt (ms), paid once per request before the first step."""

    tokens_per_step: float
    tree_size: float
    draft_ms: float
    head_prefill_ms: float
    accepted_by_depth: tuple[float, ...]  # alpha_d: P(depth d accepted | depth d-1 was), from the steps


def target_features(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """The target's features (post-norm last hidden states) over `ids`, teacher-forced: (len(ids), H)."""
    from profilers.model_parts import decoder_parts

    device = next(model.parameters()).device
    with torch.inference_mode():
        return decoder_parts(model).base(torch.tensor([list(ids)], device=device)).last_hidden_state[0]


def accepted_nodes(parents: Sequence[int], tokens: Sequence[int], truth: Sequence[int]) -> list[int]:
    """The nodes (root to leaf) of the longest tree path spelling a prefix of `truth`: what greedy verification
    accepts when `truth` is the target's greedy continuation."""
    path: list[int] = []
    node = -1
    while len(path) < len(truth):
        nxt = next((i for i, p in enumerate(parents) if p == node and tokens[i] == truth[len(path)]), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def acceptance_by_depth(accepted_per_step: Sequence[int], depth: int | None = None) -> list[float]:
    """alpha_d = P(depth d accepted | depth d - 1 was), d = 1..`depth` (default: the deepest reached), from the
    accepted lengths of verify steps; 0.0 where no step reached depth d - 1."""
    out = []
    for d in range(1, (max(accepted_per_step, default=0) if depth is None else depth) + 1):
        before = sum(1 for a in accepted_per_step if a >= d - 1)
        out.append(sum(1 for a in accepted_per_step if a >= d) / before if before else 0.0)
    return out


def simulate_eagle(model: Any, drafter: Any, sequences: Sequence[tuple[list[int], list[int]]],
                   features: dict[int, torch.Tensor] | None = None) -> EagleSimulation:
    """Run `drafter` (an `EagleDrafter` for `model`) over the target's greedy continuations `sequences` as the
    decode loop would, with the target's teacher-forced features; `features` caches them per sequence index."""
    from policies.drafters import Sampling

    features = {} if features is None else features
    steps, produced, sizes, draft_times, prefill_times = 0, 0, [], [], []
    reached: list[int] = []
    for index, (prompt, continuation) in enumerate(sequences):
        full = prompt + continuation
        if index not in features:
            features[index] = target_features(model, full[:-1])
        feats = features[index]
        drafter.begin(torch.tensor([prompt]))
        drafter.observe_features(feats[:len(prompt)])
        t = 1  # the first new token comes from the prefill
        first = True
        while t < len(continuation):
            context = prompt + continuation[:t]
            start = time.perf_counter()
            with torch.inference_mode():
                draft = drafter.propose(context, Sampling(), None)
            elapsed = (time.perf_counter() - start) * 1e3
            (prefill_times if first else draft_times).append(elapsed)
            first = False
            path = accepted_nodes(draft.parents, draft.tokens, continuation[t:])
            root = len(context) - 1
            rows = torch.zeros(1 + len(draft), feats.shape[1], dtype=feats.dtype, device=feats.device)
            rows[0] = feats[root]
            for depth, node in enumerate(path):
                if root + 1 + depth < len(feats):
                    rows[node + 1] = feats[root + 1 + depth]
            drafter.observe_features(rows)
            drafter.commit(path)
            steps += 1
            produced += len(path) + 1
            sizes.append(len(draft))
            reached.append(len(path))
            t += len(path) + 1
    alpha = acceptance_by_depth(reached)
    return EagleSimulation(tokens_per_step=produced / steps if steps else 1.0,
                           tree_size=statistics.mean(sizes) if sizes else 0.0,
                           draft_ms=statistics.median(draft_times) if draft_times else 0.0,
                           head_prefill_ms=statistics.median(prefill_times) if prefill_times else 0.0,
                           accepted_by_depth=tuple(round(a, 4) for a in alpha))


def section_key(section: dict[str, Any]) -> str:
    """What decides an EAGLE section's simulation: the head, the vocabulary and the tree."""
    import json

    return json.dumps({"eagle": section.get("eagle"), "tree": section.get("tree")}, sort_keys=True)
