"""The sparse-kernel profile: one row per layer, group, sparsity and kernel; the break-even reading."""

from __future__ import annotations

from policies.sparse_kernels import KERNELS
from policies.testing import tiny_llama
from search_spaces.sparsity_profiler import break_even, profile_sparse_kernels


def test_profile_covers_every_layer_group_sparsity_and_kernel():
    rows = profile_sparse_kernels(tiny_llama(layers=2), sparsities=(0.0, 0.5), repeats=3)
    keys = {(r["layer"], r["group"], r["sparsity"], r["kernel"]) for r in rows}
    assert len(keys) == len(rows) == 2 * 4 * 2 * len(KERNELS)  # layers x groups x sparsities x kernels
    assert all(r["us"] > 0 for r in rows)
    # layers share shapes: the second layer's numbers are the first layer's measurement
    first = {(r["group"], r["sparsity"], r["kernel"]): r["us"] for r in rows if r["layer"] == 0}
    assert all(first[(r["group"], r["sparsity"], r["kernel"])] == r["us"] for r in rows if r["layer"] == 1)


def test_break_even_is_the_lowest_sparsity_where_a_sparse_kernel_wins():
    def row(s, kernel, us):
        return {"group": "down", "sparsity": s, "kernel": kernel, "us": us}

    rows = [row(0.5, "dense", 10), row(0.5, "gather_mv", 12), row(0.5, "embedding_bag_mv", 11),
            row(0.7, "dense", 10), row(0.7, "gather_mv", 11), row(0.7, "embedding_bag_mv", 9)]
    assert break_even(rows, "down") == 0.7
    assert break_even(rows[:3], "down") is None
