"""Draft tree shapes: hand-made shapes are what they claim, and Sequoia's DP finds the true optimum.

The optimum is checked against brute force over every parent list of up to 6 nodes (each node's parent is
any earlier node or the root), which covers every tree shape in every node order.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest

from policies.tree_attention import node_depths, validate_parents
from search_spaces.speculative_trees import (
    branching_tree,
    chain_tree,
    expected_accepted,
    nodes_per_depth,
    sequoia_curve,
    sequoia_tree,
    sibling_ranks,
    tree_depth,
)

ACC_VECTORS = {
    "flat": [0.2, 0.2, 0.2, 0.2, 0.2],
    "steep": [0.8, 0.1, 0.05],
    "rank0_only": [0.9],
    "two_even": [0.45, 0.45],
    "unsorted": [0.1, 0.6, 0.2],
    "zero_gap": [0.5, 0.0, 0.3],
    "all_zero": [0.0, 0.0],
    "empty": [],
}
MAX_NODES = 6


def _all_parent_lists(max_nodes: int):
    """Every parent list with parent < child, 0..max_nodes nodes."""
    for n in range(max_nodes + 1):
        yield from (list(p) for p in itertools.product(*[range(-1, i) for i in range(n)]))


ALL_TREES = [(p, tree_depth(p)) for p in _all_parent_lists(MAX_NODES)]


def _brute_force_best(acc: list[float], budget: int, max_depth: int | None) -> float:
    return max(expected_accepted(p, acc) for p, depth in ALL_TREES
               if len(p) <= budget and (max_depth is None or depth <= max_depth))


def _is_bfs_rank_order(parents: list[int]) -> bool:
    """Breadth first with each node's children contiguous: exactly when parent indices never decrease."""
    return all(a <= b for a, b in zip(parents, parents[1:], strict=False))


# ---- hand-made shapes -----------------------------------------------------------------------------

def test_chain_tree():
    assert chain_tree(0) == []
    assert chain_tree(1) == [-1]
    assert chain_tree(4) == [-1, 0, 1, 2]
    assert node_depths(chain_tree(5)) == [0, 1, 2, 3, 4]
    assert tree_depth(chain_tree(5)) == 5
    assert sibling_ranks(chain_tree(5)) == [0] * 5


def test_branching_tree_small_cases():
    assert branching_tree([]) == []
    assert branching_tree([3]) == [-1, -1, -1]
    assert branching_tree([2, 1]) == [-1, -1, 0, 1]
    assert branching_tree([1, 1, 1]) == chain_tree(3)
    assert branching_tree([2, 2]) == [-1, -1, 0, 0, 1, 1]


def test_branching_tree_4_2_1():
    parents = branching_tree([4, 2, 1])
    assert len(parents) == 4 + 8 + 8 == 20
    assert validate_parents(parents) == []
    assert nodes_per_depth(parents) == [4, 8, 8]
    assert node_depths(parents) == [0] * 4 + [1] * 8 + [2] * 8
    assert parents[:4] == [-1] * 4
    assert parents[4:12] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert parents[12:] == list(range(4, 12))
    assert sibling_ranks(parents) == [0, 1, 2, 3] + [0, 1] * 4 + [0] * 8
    assert _is_bfs_rank_order(parents)


def test_sibling_ranks_and_per_depth_counts():
    parents = [-1, -1, 0, 0, 1, -1, 2]
    assert sibling_ranks(parents) == [0, 1, 0, 1, 0, 2, 0]
    assert nodes_per_depth(parents) == [3, 3, 1]
    assert tree_depth(parents) == 3
    assert nodes_per_depth([]) == [] and tree_depth([]) == 0 and sibling_ranks([]) == []


# ---- expected acceptance ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_expected_accepted_chain_is_geometric(k):
    a = 0.7
    assert expected_accepted(chain_tree(k), [a]) == pytest.approx(sum(a ** i for i in range(1, k + 1)), abs=1e-12)


def test_expected_accepted_hand_computed():
    # node0 rank0: .5; node1 rank1: .3; node2 = 0's rank0: .5*.5; node3 = 0's rank1: .5*.3; node4 = 1's rank0: .3*.5
    assert expected_accepted([-1, -1, 0, 0, 1], [0.5, 0.3]) == pytest.approx(0.5 + 0.3 + 0.25 + 0.15 + 0.15)
    # a rank beyond the vector is never accepted, nor is anything below it
    assert expected_accepted([-1, -1, -1, 2], [0.5, 0.3]) == pytest.approx(0.8)
    assert expected_accepted([], [0.5]) == 0.0


# ---- Sequoia's DP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ACC_VECTORS))
@pytest.mark.parametrize("max_depth", [None, 0, 1, 2, 3])
def test_sequoia_matches_brute_force(name, max_depth):
    acc = ACC_VECTORS[name]
    curve = sequoia_curve(acc, range(MAX_NODES + 1), max_depth=max_depth)
    for budget, (value, parents) in curve.items():
        assert value == pytest.approx(_brute_force_best(acc, budget, max_depth), abs=1e-9), (name, budget)
        assert expected_accepted(parents, acc) == pytest.approx(value, abs=1e-9)
        assert validate_parents(parents) == []
        assert len(parents) <= budget
        assert max_depth is None or tree_depth(parents) <= max_depth
        assert _is_bfs_rank_order(parents)


def test_sequoia_tree_agrees_with_curve():
    acc = ACC_VECTORS["steep"]
    curve = sequoia_curve(acc, [3, 10, 25], max_depth=4)
    for budget, (_, parents) in curve.items():
        assert sequoia_tree(acc, budget, max_depth=4) == parents


@pytest.mark.parametrize("max_depth", [None, 3, 8])
def test_sequoia_monotone_in_budget_and_depth(max_depth):
    acc = [0.6, 0.2, 0.1, 0.05]
    values = [v for v, _ in sequoia_curve(acc, range(65), max_depth=max_depth).values()]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False))
    deeper = sequoia_curve(acc, [64], max_depth=None if max_depth is None else max_depth + 1)[64][0]
    assert deeper >= values[64] - 1e-12


def test_rank0_only_gives_a_chain():
    assert sequoia_tree([0.9], 7) == chain_tree(7)
    assert sequoia_tree([0.9], 7, max_depth=3) == chain_tree(3)


def test_even_two_ranks_branch():
    parents = sequoia_tree([0.45, 0.45], 3)
    assert nodes_per_depth(parents)[0] == 2
    assert parents == [-1, -1, 0]


def test_unsorted_acc_keeps_rank_order():
    # rank 1 is the good one, but it only exists next to a rank-0 sibling
    assert sequoia_tree([0.1, 0.6], 2) == [-1, -1]
    assert sequoia_tree([0.1, 0.6], 3) == [-1, -1, 1]


def test_zero_acceptance_adds_no_nodes():
    assert sequoia_tree([0.0, 0.0], 10) == []
    assert sequoia_tree([], 10) == []
    assert sequoia_tree([0.5], 0) == []
    assert sequoia_tree([0.5], 5, max_depth=0) == []


def test_sequoia_large_budget_is_fast_and_within_limits():
    acc = [0.41, 0.17, 0.09, 0.06, 0.04, 0.03, 0.02, 0.01]  # not used elsewhere: no memoised table
    start = time.process_time()
    parents = sequoia_tree(acc, 128, max_depth=12)
    assert time.process_time() - start < 2.0
    assert len(parents) <= 128 and tree_depth(parents) <= 12
    assert _is_bfs_rank_order(parents)
    counts = nodes_per_depth(parents)
    assert counts[0] <= len(acc)
    # the best tree beats the chain and a hand-made tree of no more nodes
    value = expected_accepted(parents, acc)
    assert value > expected_accepted(chain_tree(12), acc)
    for shape in ([8, 2, 1, 1], [4, 2, 2, 1, 1]):  # 56 and 60 nodes
        assert value >= expected_accepted(branching_tree(shape), acc)


# ---- bad inputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "message"), [
    (lambda: sequoia_tree([0.5], -1), "node_budget must be >= 0"),
    (lambda: sequoia_tree([0.5], 2.5), "node_budget must be a non-negative integer"),
    (lambda: sequoia_tree([0.5], 4, max_depth=-2), "max_depth must be >= 0"),
    (lambda: sequoia_tree([1.2], 4), r"acc\[0\] = 1.2 must be a probability"),
    (lambda: sequoia_tree([0.5, -0.1], 4), r"acc\[1\] = -0.1 must be a probability"),
    (lambda: sequoia_tree([math.nan], 4), r"acc\[0\] = nan must be a probability"),
    (lambda: sequoia_tree(["0.5"], 4), r"acc\[0\] must be a number"),
    (lambda: sequoia_tree([0.7, 0.4], 4), r"sum\(acc\) = 1.1 exceeds 1"),
    (lambda: sequoia_curve([0.5], [4, -3]), "node_budget must be >= 0"),
    (lambda: expected_accepted([-1], [0.6, 0.6]), r"sum\(acc\)"),
    (lambda: expected_accepted([0], [0.5]), r"parents\[0\]"),
    (lambda: sibling_ranks([-1, 1]), r"parents\[1\]"),
    (lambda: branching_tree([2, 0]), r"branching\[1\] must be a positive integer"),
    (lambda: branching_tree([True]), r"branching\[0\]"),
    (lambda: chain_tree(-1), "k must be >= 0"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sum_tolerance_allows_rounding():
    assert sequoia_tree([0.5, 0.5 + 1e-9], 2) == [-1, -1]
