"""Activation sparsity: calibrated thresholds reproduce their level on held-out text; level 0 and remove() are
bit-identical to dense; bad levels are refused with the field named."""

from __future__ import annotations

import pytest
import torch

from policies.sparsity import GROUPS, SparsifiedInputs, calibrate_thresholds
from profilers.hf_compat import cache_arg
from tuner.models import load_model
from tuner.tasks import code_samples

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals


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
    sparse = SparsifiedInputs(tiny.model, thresholds, method=method, track=True)
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


def _policy(model, section):
    from policies import model_fingerprint
    from policies.testing import make_policy_dict

    return make_policy_dict(model_fingerprint(model), techniques={"sparsity": section})


@pytest.mark.parametrize("section, field", [
    ({"method": "teal", "levels": [[0.5, 0.5, 0.5, -0.1]], "thresholds": [[0.1] * 4]},
     "techniques.sparsity.levels[0].down: must be a number in [0, 1)"),
    ({"method": "teal", "levels": [[1.0, 0.5, 0.5, 0.5]], "thresholds": [[0.1] * 4]},
     "techniques.sparsity.levels[0].qkv"),
    ({"levels": [[0.5] * 4, [0.5] * 4], "thresholds": [[0.1] * 4]}, "techniques.sparsity.thresholds: 1 layers"),
    ({"levels": [[0.5] * 3], "thresholds": [[0.1] * 4]}, "techniques.sparsity.levels[0]: must be a list of 4"),
    ({"method": "owl", "levels": [[0.5] * 4], "thresholds": [[0.1] * 4]}, "techniques.sparsity.method"),
])
def test_invalid_sections_are_refused_with_the_field_named(section, field):
    from policies import PolicyError, policy_from_dict
    from policies.sparsity import SparsityConfig
    from policies.testing import make_policy_dict

    problems = SparsityConfig.section_problems(section)
    assert any(p.startswith(field) for p in problems), problems
    with pytest.raises(PolicyError, match="techniques.sparsity"):
        policy_from_dict(make_policy_dict(techniques={"sparsity": section}))


def test_apply_checks_the_layer_count_against_the_model(tiny):
    from policies import PolicyError, apply_policy

    levels = [[0.4] * len(GROUPS)] * 2
    section = {"method": "teal", "levels": levels, "thresholds": [[0.1] * len(GROUPS)] * 2}
    with pytest.raises(PolicyError, match="techniques.sparsity.thresholds: has 2 layers, the model has 6"):
        apply_policy(tiny.model, _policy(tiny.model, section))


@pytest.mark.parametrize("kernel", ["embedding_bag_mv", "gather_mv"])
def test_sparse_row_kernels_equal_masking_at_decode_and_remove_restores(tiny, monkeypatch, kernel):
    from transformers import DynamicCache

    from policies import apply_policy, sparse_kernels

    calls = []
    real = sparse_kernels.sparse_mv
    monkeypatch.setattr(sparse_kernels, "sparse_mv", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    levels = [[0.5] * len(GROUPS)] * 6
    thresholds = calibrate_thresholds(tiny.model, _batches(tiny.tokenizer, seed=11, n=2),
                                      [dict(zip(GROUPS, row, strict=True)) for row in levels])
    masking = {"method": "teal", "levels": levels, "thresholds": [[t[g] for g in GROUPS] for t in thresholds]}
    executing = dict(masking, kernels=[[kernel] * len(GROUPS)] * 6)
    ids = _batches(tiny.tokenizer, seed=5, n=1)[0][:, :64]
    with torch.inference_mode():
        dense = tiny.model(ids).logits

    def decode_step_logits(section):
        with torch.inference_mode(), apply_policy(tiny.model, _policy(tiny.model, section)):
            cache = DynamicCache(config=tiny.model.config)
            tiny.model(ids[:, :-1], **cache_arg(tiny.model, cache), use_cache=True)  # several rows: the dense path
            return tiny.model(ids[:, -1:], **cache_arg(tiny.model, cache), use_cache=True).logits

    expected = decode_step_logits(masking)
    assert not calls
    got = decode_step_logits(executing)
    assert calls and set(calls) == {kernel}  # the single-row step ran the sparse kernel
    assert torch.allclose(got, expected, atol=1e-4)
    lin = tiny.model.model.layers[0].mlp.down_proj
    assert "forward" not in lin.__dict__  # the linear's own forward is back
    with torch.inference_mode():
        assert torch.equal(tiny.model(ids).logits, dense)


def test_kernels_field_is_validated():
    from policies.sparsity import SparsityConfig

    section = {"levels": [[0.5] * 4], "thresholds": [[0.1] * 4], "kernels": [["dense", "triton", "dense", "dense"]]}
    assert any(p.startswith("techniques.sparsity.kernels[0]") for p in SparsityConfig.section_problems(section))
