"""Shapes of draft token trees for speculative decoding, and the best shape for a given drafter.

A tree is a parent list (see `policies.tree_attention`): node i hangs off `parents[i]`, an earlier node,
or off the root (-1), the last verified token. The j-th child of a node, in index order, carries the
drafter's rank-j candidate. That makes a tree's worth depend only on its shape once we know how often a
rank-r candidate is the accepted one.

This module builds the usual hand-made shapes (a chain, a per-depth branching tree) and the shape that
Sequoia (Chen et al. 2024, "Sequoia: Scalable, Robust, and Hardware-aware Speculative Decoding") derives
by dynamic programming from a positional acceptance vector `acc`: `acc[r]` is the probability that the
rank-r child is accepted given its parent was reached. A node is reached when every node on its path is
accepted, so a tree accepts on average the sum, over its nodes, of the product of `acc[rank]` along the
path; each verification step adds one bonus token on top.

The tuner pairs these expected-acceptance curves with the measured cost of verifying n tokens on this
device to pick a tree size, which is where the hardware awareness comes from. Pure Python: the DP for
128 nodes and 8 ranks runs in a fraction of a second.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from policies.tree_attention import node_depths, validate_parents

__all__ = [
    "branching_tree",
    "chain_tree",
    "expected_accepted",
    "nodes_per_depth",
    "sequoia_curve",
    "sequoia_tree",
    "sibling_ranks",
    "tree_depth",
]

# Slack for a probability vector that was estimated and normalised in floating point.
_SUM_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _checked_parents(parents: Sequence[int]) -> list[int]:
    """The parent list as a list, or ValueError naming its first problem (reuses the runtime's check)."""
    problems = validate_parents(parents)
    if problems:
        raise ValueError(problems[0])
    return list(parents)


def _checked_acc(acc: Sequence[float]) -> tuple[float, ...]:
    """A positional acceptance vector as floats; rejects what cannot be probabilities of exclusive events."""
    values = []
    for r, a in enumerate(acc):
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ValueError(f"acc[{r}] must be a number, got {a!r}")
        if not (0.0 <= a <= 1.0):  # also rejects NaN
            raise ValueError(f"acc[{r}] = {a!r} must be a probability in [0, 1]")
        values.append(float(a))
    total = math.fsum(values)
    if total > 1.0 + _SUM_TOLERANCE:
        raise ValueError(f"sum(acc) = {total:.6g} exceeds 1: at most one child of a node is accepted, "
                         "so the rank acceptance probabilities must sum to <= 1")
    return tuple(values)


def _checked_count(value: int, name: str) -> int:
    """A non-negative integer (bools are rejected: `True` nodes is a bug, not a budget)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Hand-made shapes and shape statistics
# --------------------------------------------------------------------------------------------------

def chain_tree(k: int) -> list[int]:
    """A chain of k draft tokens (classic speculative decoding): [-1, 0, 1, ..., k-2]."""
    k = _checked_count(k, "k")
    return [i - 1 for i in range(k)]


def branching_tree(branching: Sequence[int]) -> list[int]:
    """Full tree with `branching[d]` children under every node of depth d-1 (the root for d = 0).

    Nodes come depth by depth, children of a node contiguous and in rank order, e.g. [2, 1] gives
    [-1, -1, 0, 1]. This is the static shape of Medusa/SpecInfer-style trees and of EAGLE's top-k expansion.
    """
    for d, b in enumerate(branching):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"branching[{d}] must be a positive integer, got {b!r}")
    parents: list[int] = []
    frontier = [-1]
    for b in branching:
        next_frontier = []
        for parent in frontier:
            for _ in range(b):
                next_frontier.append(len(parents))
                parents.append(parent)
        frontier = next_frontier
    return parents


def sibling_ranks(parents: Sequence[int]) -> list[int]:
    """Rank of each node among its siblings (0 for the first child in index order): its drafter rank."""
    seen: dict[int, int] = {}
    ranks = []
    for p in _checked_parents(parents):
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
    return ranks


def tree_depth(parents: Sequence[int]) -> int:
    """Number of levels of draft tokens (a chain of k has depth k): the draft forwards a step needs."""
    depths = node_depths(parents)
    return max(depths) + 1 if depths else 0


def nodes_per_depth(parents: Sequence[int]) -> list[int]:
    """How many nodes sit at each level; the width of each draft forward."""
    counts = [0] * tree_depth(parents)
    for d in node_depths(parents):
        counts[d] += 1
    return counts


def expected_accepted(parents: Sequence[int], acc: Sequence[float]) -> float:
    """Expected accepted draft tokens per step under the positional model (excludes the bonus token).

    Ranks at or beyond len(acc) are never accepted.
    """
    checked = _checked_parents(parents)
    probs = _checked_acc(acc)
    reach: list[float] = []
    for p, r in zip(checked, sibling_ranks(checked), strict=True):
        a = probs[r] if r < len(probs) else 0.0
        reach.append(a if p == -1 else reach[p] * a)
    return math.fsum(reach)


# --------------------------------------------------------------------------------------------------
# Sequoia's dynamic program
# --------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Level:
    """Best subtrees below a node with a fixed number of levels left beneath it.

    value[n]: best expected accepted tokens below the node using at most n nodes;
    kids[n]: number of children of that best subtree;
    split[j][n]: nodes (child included) given to child rank j-1 when the node has j children and at most n
    nodes below it; the other j-1 children share the rest, read back from split[j-1].
    child: the level of the children (itself when depth is unbounded; None when no level is left).
    """

    value: list[float]
    kids: list[int]
    split: list[list[int]]
    child: _Level | None = field(default=None, repr=False)

    def child_sizes(self, n: int) -> list[int]:
        """Nodes (each child included) given to children rank 0, 1, ... of a node with n nodes below it."""
        sizes = []
        remaining = n
        for j in range(self.kids[n], 0, -1):
            m = self.split[j][remaining]
            sizes.append(m)
            remaining -= m
        return sizes[::-1]


def _solve_level(acc: tuple[float, ...], budget: int, below: _Level | None) -> _Level:
    """One level of the DP; children's subtrees come from `below`, or from this level when it is None.

    exact[j][n] is the best value with exactly j children (ranks 0..j-1, since a rank-j child only exists
    once ranks 0..j-1 do) and at most n nodes; the last child takes m nodes, the first j-1 the rest. Filling
    n in increasing order lets the unbounded-depth level read its own smaller entries.
    Costs O(budget^2 * len(acc)). Ties keep fewer nodes and fewer children (strict improvements only).
    """
    ranks = len(acc)
    level = _Level(value=[0.0] * (budget + 1), kids=[0] * (budget + 1),
                   split=[[0] * (budget + 1) for _ in range(ranks + 1)])
    level.child = level if below is None else below
    sub = level.child.value
    exact = [[0.0] * (budget + 1)] + [[-math.inf] * (budget + 1) for _ in range(ranks)]
    for n in range(1, budget + 1):
        best_value, best_kids = 0.0, 0
        for j in range(1, min(ranks, n) + 1):
            a, prev = acc[j - 1], exact[j - 1]
            best, best_m = -math.inf, 0
            for m in range(1, n - j + 2):
                v = prev[n - m] + a * (1.0 + sub[m - 1])
                if v > best:
                    best, best_m = v, m
            exact[j][n] = best
            level.split[j][n] = best_m
            if best > best_value:
                best_value, best_kids = best, j
        level.value[n], level.kids[n] = best_value, best_kids
    return level


@lru_cache(maxsize=16)
def _solve(acc: tuple[float, ...], budget: int, max_depth: int | None) -> _Level:
    """The DP table for the root (memoised: a tuner asks for the same vector many times).

    A depth limit at or above the budget cannot bind, so it is solved as unbounded (one self-referencing
    level, O(budget^2 * ranks)); otherwise one level per depth, O(max_depth * budget^2 * ranks).
    """
    if max_depth is None or max_depth >= budget:
        return _solve_level(acc, budget, None)
    level = _Level(value=[0.0] * (budget + 1), kids=[0] * (budget + 1), split=[])  # no level left below
    for _ in range(max_depth):
        level = _solve_level(acc, budget, level)
    return level


def _build_tree(root: _Level, budget: int) -> list[int]:
    """Parents of the DP's best tree, breadth first, each node's children contiguous and in rank order."""
    parents: list[int] = []
    queue: deque[tuple[int, int, _Level]] = deque([(-1, budget, root)])
    while queue:
        parent, n_below, level = queue.popleft()
        for size in level.child_sizes(n_below):
            parents.append(parent)
            assert level.child is not None  # a level with children always has a level below
            queue.append((len(parents) - 1, size - 1, level.child))
    return parents


def _checked_depth(max_depth: int | None) -> int | None:
    return None if max_depth is None else _checked_count(max_depth, "max_depth")


def sequoia_curve(acc: Sequence[float], budgets: Iterable[int],
                  max_depth: int | None = None) -> dict[int, tuple[float, list[int]]]:
    """For each node budget, the best expected accepted tokens and the tree reaching it.

    One DP for the largest budget answers every smaller one (the table is indexed by budget), so a whole
    accepted-tokens-versus-tree-size curve, the drafting side of Sequoia's hardware-aware choice, costs
    one solve. The tree may use fewer nodes than its budget when extra nodes would add nothing.
    """
    probs = _checked_acc(acc)
    wanted = [_checked_count(b, "node_budget") for b in budgets]
    depth = _checked_depth(max_depth)
    if not wanted:
        return {}
    root = _solve(probs, max(wanted), depth)
    return {b: (root.value[b], _build_tree(root, b)) for b in wanted}


def sequoia_tree(acc: Sequence[float], node_budget: int, max_depth: int | None = None) -> list[int]:
    """The tree of at most `node_budget` draft nodes (at most `max_depth` levels) with the most expected
    accepted tokens under the positional acceptance model: Sequoia's optimal tree for this drafter.
    """
    return sequoia_curve(acc, [node_budget], max_depth)[node_budget][1]
