"""TEAL's greedy per-projection allocation: the path raises one group per step, block sparsity grows
monotonically, and reading a target off the path gives monotone, parameter-weighted levels."""

from __future__ import annotations

import pytest
import torch

from policies.sparsity import GROUPS, group_linears
from policies.testing import tiny_llama
from search_spaces.sparsity_greedy import STEP, block_level, greedy_paths, levels_for


@pytest.fixture(scope="module")
def model_and_paths():
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    batches = [torch.randint(3, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    return model, greedy_paths(model, batches, max_block_level=0.6)


def test_each_step_raises_exactly_one_group_and_block_sparsity_grows(model_and_paths):
    model, paths = model_and_paths
    assert len(paths) == 2
    for path in paths:
        previous = dict.fromkeys(GROUPS, 0.0)
        last_block = 0.0
        for block, levels in path:
            raised = [g for g in GROUPS if levels[g] != previous[g]]
            assert len(raised) == 1 and levels[raised[0]] == pytest.approx(previous[raised[0]] + STEP)
            assert block > last_block
            previous, last_block = levels, block
        assert last_block >= 0.6 - 1e-9


def test_block_level_is_weighted_by_parameters(model_and_paths):
    model, _ = model_and_paths
    params = {g: sum(lin.weight.numel() for lin in lins) for g, lins in group_linears(model)[0].items()}
    only_down = {**dict.fromkeys(GROUPS, 0.0), "down": 1.0}
    assert block_level(only_down, params) == pytest.approx(params["down"] / sum(params.values()))


def test_levels_for_a_target_are_monotone_and_never_exceed_it(model_and_paths):
    model, paths = model_and_paths
    params = {g: sum(lin.weight.numel() for lin in lins) for g, lins in group_linears(model)[0].items()}
    assert levels_for(paths, 0.0) == [[0.0] * len(GROUPS)] * 2
    previous = levels_for(paths, 0.0)
    for target in (0.1, 0.2, 0.4, 0.6):
        rows = levels_for(paths, target)
        for row, before in zip(rows, previous, strict=True):
            assert all(a >= b for a, b in zip(row, before, strict=True))
            assert block_level(dict(zip(GROUPS, row, strict=True)), params) <= target + 1e-3
        previous = rows
