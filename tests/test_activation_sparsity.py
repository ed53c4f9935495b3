"""Activation sparsity: calibrated thresholds reproduce their level on held-out text; level 0 and remove() are
bit-identical to dense; bad levels are refused with the field named."""

from __future__ import annotations

import pytest
import torch

from policies.activation_sparsity import GROUPS, SparsifiedInputs, calibrate_thresholds
from tuner.models import load_model
from tuner.tasks import code_samples


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def _batches(tokenizer, seed: int, n: int = 3) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt").input_ids for t in code_samples(n, seed=seed, n_chars=1500)]


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_calibrated_thresholds_reproduce_the_level_on_held_out_text(tiny, method):
    levels = [dict.fromkeys(GROUPS, 0.4) for _ in range(6)]
    levels[5]["down"] = 0.7
    thresholds = calibrate_thresholds(tiny.model, _batches(tiny.tokenizer, seed=11), levels, method=method)
    sparse = SparsifiedInputs(tiny.model, thresholds, method=method)
    try:
        with torch.inference_mode():
            for ids in _batches(tiny.tokenizer, seed=99):
                tiny.model(ids)
        observed = sparse.observed_sparsity()
    finally:
        sparse.remove()
    assert len(observed) == 6 * len(GROUPS)
    for (layer, group), value in observed.items():
        assert abs(value - levels[layer][group]) <= 0.02, (layer, group, value)


def test_level_zero_is_bit_identical_and_remove_restores(tiny):
    ids = _batches(tiny.tokenizer, seed=5, n=1)[0]
    with torch.inference_mode():
        dense = tiny.model(ids).logits
        zero = SparsifiedInputs(tiny.model, calibrate_thresholds(tiny.model, [ids], [dict.fromkeys(GROUPS, 0.0)] * 6))
        assert torch.equal(tiny.model(ids).logits, dense)
        zero.remove()
        half = SparsifiedInputs(tiny.model, calibrate_thresholds(tiny.model, [ids], [dict.fromkeys(GROUPS, 0.5)] * 6))
        assert not torch.equal(tiny.model(ids).logits, dense)
        half.remove()
        assert torch.equal(tiny.model(ids).logits, dense)


def test_bad_levels_and_layer_counts_are_refused(tiny):
    batches = _batches(tiny.tokenizer, seed=5, n=1)
    with pytest.raises(ValueError, match=r"levels\[2\].qkv: must be in \[0, 1\)"):
        calibrate_thresholds(tiny.model, batches, [dict.fromkeys(GROUPS, 0.5)] * 2 + [{"qkv": 1.0}] + [{}] * 3)
    with pytest.raises(ValueError, match=r"levels\[0\].mlp: unknown group"):
        calibrate_thresholds(tiny.model, batches, [{"mlp": 0.5}] + [{}] * 5)
    with pytest.raises(ValueError, match="got 2 layers, the model has 6"):
        calibrate_thresholds(tiny.model, batches, [{}] * 2)
    with pytest.raises(ValueError, match="got 1 layers, the model has 6"):
        SparsifiedInputs(tiny.model, [{"qkv": 0.1}])
    with pytest.raises(ValueError, match="unknown activation-sparsity method"):
        calibrate_thresholds(tiny.model, batches, [{}] * 6, method="magic")
