"""Weight sparsity: masks zero exactly the asked fraction of the lowest scores; apply/remove is bit-exact; bad
sections are refused with the field named; it composes with activation sparsity; `tune` writes a policy."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from policies.schema import PolicyError
from policies.sparsity import GROUPS, calibrate_thresholds
from policies.weight_sparsity import (
    WeightSparsityConfig,
    encode_norms,
    input_norms,
    magnitude_mask,
    two_four_mask,
    wanda_mask,
)
from profilers.hf_compat import cache_arg

PATH = "techniques.weight_sparsity"


@pytest.fixture(scope="module")
def small() -> LlamaForCausalLM:
    """A 2-layer random Llama: fast enough for every apply/remove test."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    from tuner.models import load_model

    return load_model("builtin:tiny")


def _ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_restored(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def _wanda_section(model: torch.nn.Module, levels: list[list[float]], batches: list[torch.Tensor]) -> dict:
    norms = input_norms(model, batches, levels=levels)
    return {"method": "wanda", "levels": levels, "norms": [[encode_norms(n[g]) for g in GROUPS] for n in norms]}


def _apply(model: torch.nn.Module, section: dict):
    from policies.registry import get_runtime

    return get_runtime("weight_sparsity").apply(model, section)


# -- masks ---------------------------------------------------------------------------------------------------------
def test_magnitude_mask_zeroes_exactly_the_fraction_of_smallest_weights_per_matrix():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    keep = magnitude_mask(w, 0.3)
    assert int((~keep).sum()) == 192  # 30% of 640
    assert w[~keep].abs().max() <= w[keep].abs().min()
    assert (~keep).sum(1).unique().numel() > 1  # per matrix: rows lose different counts
    assert magnitude_mask(w, 0.0).all()


def test_wanda_mask_zeroes_the_fraction_of_lowest_scores_in_every_row():
    gen = torch.Generator().manual_seed(1)
    w, norms = torch.randn(12, 40, generator=gen), torch.rand(40, generator=gen) * 5
    keep = wanda_mask(w, norms, 0.5)
    assert ((~keep).sum(1) == 20).all()
    scores = w.abs() * norms
    for row, k in zip(scores, keep, strict=True):
        assert row[~k].max() <= row[k].min()
    with pytest.raises(ValueError, match="input channels"):
        wanda_mask(w, norms[:10], 0.5)


def test_wanda_with_uniform_norms_is_per_row_magnitude():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    expected = torch.ones_like(w, dtype=torch.bool)
    expected.scatter_(1, w.abs().argsort(dim=1)[:, :8], False)  # the 8 smallest |w| of each row
    assert torch.equal(wanda_mask(w, torch.full((32,), 3.0), 0.25), expected)
    assert not torch.equal(magnitude_mask(w, 0.25), expected)  # per matrix is a different rule


def test_two_four_mask_keeps_the_two_highest_of_every_four():
    scores = torch.rand(6, 32, generator=torch.Generator().manual_seed(3))
    keep = two_four_mask(scores)
    groups, kept = scores.view(-1, 4), keep.view(-1, 4)
    assert (kept.sum(1) == 2).all()
    assert (groups.masked_fill(~kept, float("inf")).min(1).values >= groups.masked_fill(kept, -1).max(1).values).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_mask(torch.rand(2, 6))


# -- calibration -----------------------------------------------------------------------------------------------------
def test_input_norms_are_channel_l2_norms_and_sequential_calibration_restores_the_weights(small):
    batches = [_ids(20, seed=1), _ids(12, seed=2)]
    norms = input_norms(small, batches)
    layer0 = small.model.layers[0]
    with torch.inference_mode():
        x = torch.cat([layer0.input_layernorm(small.model.embed_tokens(b))[0] for b in batches])
    assert torch.allclose(norms[0]["qkv"], x.norm(dim=0), rtol=1e-5)
    assert [norms[1][g].numel() for g in GROUPS] == [64, 64, 64, 128]
    before = _snapshot(small)
    pruned_first = input_norms(small, batches, levels=[[0.5] * 4, [0.5] * 4])
    _assert_restored(small, before)
    assert all(torch.equal(pruned_first[0][g], norms[0][g]) for g in GROUPS)  # layer 0 sees dense input
    assert not torch.allclose(pruned_first[1]["qkv"], norms[1]["qkv"])  # layer 1 sees pruned layer 0


# -- runtime -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_apply_zeroes_the_levels_and_remove_restores_every_parameter_bit_exactly(small, method):
    levels = [[0.5, 0.0, 0.25, 0.75], [0.1, 0.5, 0.0, 0.5]]
    section = (_wanda_section(small, levels, [_ids(32)]) if method == "wanda"
               else {"method": method, "levels": levels})
    before, ids = _snapshot(small), _ids()
    dense = _logits(small, ids)
    handle = _apply(small, section)
    try:
        for layer, row in zip(small.model.layers, levels, strict=True):
            for group, level in zip(GROUPS, row, strict=True):
                for lin in (layer.get_submodule(p) for p in GROUPS[group]):
                    zero = lin.weight == 0
                    if method == "wanda":  # every row loses the same count
                        assert (zero.sum(1) == int(level * lin.in_features)).all()
                    else:
                        assert int(zero.sum()) == int(level * lin.weight.numel())
        assert not torch.equal(_logits(small, ids), dense)
    finally:
        handle.remove()
    _assert_restored(small, before)
    assert torch.equal(_logits(small, ids), dense)
    handle.remove()  # idempotent



def test_level_zero_is_bit_identical_to_dense(small):
    ids = _ids()
    dense = _logits(small, ids)
    for section in ({"method": "magnitude", "levels": [[0.0] * 4] * 2},
                    _wanda_section(small, [[0.0] * 4] * 2, [_ids(16)])):
        handle = _apply(small, section)
        assert torch.equal(_logits(small, ids), dense)
        handle.remove()


def _b64(values: list[float]) -> str:
    return encode_norms(torch.tensor(values))


@pytest.mark.parametrize("section, field", [
    ({"method": "magnitude", "levels": [[0.5, 0.5, 0.5, -0.1]]}, f"{PATH}.levels[0].down: must be a number in [0, 1)"),
    ({"method": "magnitude", "levels": [[0.5] * 4, [1.0, 0.5, 0.5, 0.5]]}, f"{PATH}.levels[1].qkv: must be a number"),
    ({"method": "magnitude", "levels": [[0.5] * 3]}, f"{PATH}.levels[0]: must be a list of 4"),
    ({"method": "magnitude"}, f"{PATH}.levels: required"),
    ({"method": "wanda", "levels": [[0.5] * 4]}, f"{PATH}.norms: required for method wanda"),
    ({"method": "wanda", "levels": [[0.5] * 4], "norms": [[_b64([1.0])] * 3 + ["not base64!"]]},
     f"{PATH}.norms[0].down: is not valid base64"),
    ({"method": "wanda", "levels": [[0.5] * 4], "norms": [[_b64([1.0])] * 3 + ["AAA="]]},
     f"{PATH}.norms[0].down: decodes to 2 bytes"),
    ({"method": "wanda", "levels": [[0.5] * 4], "norms": [[_b64([1.0])] * 3 + [_b64([-1.0])]]},
     f"{PATH}.norms[0].down: norms must be finite and >= 0"),
    ({"method": "wanda", "levels": [[0.5] * 4] * 2, "norms": [[_b64([1.0])] * 4]}, f"{PATH}.norms: 1 layers"),
    ({"method": "magnitude", "levels": [[0.5] * 4], "norms": [[_b64([1.0])] * 4]},
     f"{PATH}.norms: only method wanda"),
    ({"method": "sparsegpt", "levels": [[0.5] * 4]}, f"{PATH}.method: must be one of magnitude, wanda"),
    ({"method": "magnitude", "structure": "4:8"}, f"{PATH}.structure: must be one of"),
    ({"method": "magnitude", "structure": "2:4", "levels": [[0.5, 0.3, 0.0, 0.5]]},
     f"{PATH}.levels[0].o: must be 0 (dense) or 0.5 with structure 2:4"),
    ({"method": "magnitude", "levels": [[0.5] * 4], "mask": 1}, f"{PATH}.mask: unknown field"),
])
def test_invalid_sections_are_refused_with_the_field_named(section, field):
    from policies import policy_from_dict
    from policies.testing import make_policy_dict

    problems = WeightSparsityConfig.section_problems(section)
    assert any(p.startswith(field) for p in problems), problems
    with pytest.raises(PolicyError, match=PATH):
        policy_from_dict(make_policy_dict(techniques={"weight_sparsity": section}))


def test_valid_sections_pass_validation():
    assert WeightSparsityConfig.section_problems({"method": "magnitude", "structure": "2:4"}) == []
    problems = WeightSparsityConfig.section_problems
    assert problems({"method": "magnitude", "structure": "2:4", "levels": [[0.5, 0, 0.5, 0.0]]}) == []
    assert problems({"method": "wanda", "levels": [[0.5] * 4], "norms": [[_b64([1.0, 2.0])] * 4]}) == []


def test_apply_checks_the_model_and_refuses_two_four_off_sparse_tensor_cores(small):
    before = _snapshot(small)
    with pytest.raises(PolicyError, match=rf"{PATH}.levels: has 3 layers, the model has 2"):
        _apply(small, {"method": "magnitude", "levels": [[0.5] * 4] * 3})
    norms = [[_b64([1.0] * 64)] * 3 + [_b64([1.0] * 64)]] * 2  # down reads 128 channels
    with pytest.raises(PolicyError, match=rf"{PATH}.norms\[0\].down: has 64 channels, the model's down input has 128"):
        _apply(small, {"method": "wanda", "levels": [[0.5] * 4] * 2, "norms": norms})
    with pytest.raises(PolicyError, match=rf"^{PATH}.structure: 2:4 needs a CUDA GPU with compute capability >= 8.0 "
                                          r"and fp16/bf16 weights; this model is on cpu$"):
        _apply(small, {"method": "magnitude", "structure": "2:4"})
    _assert_restored(small, before)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need CUDA sm80+")
def test_two_four_on_sparse_tensor_cores_matches_dense_masking():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval().to("cuda", torch.float16)
    ids, before = _ids(64).cuda(), _snapshot(model)
    dense = _logits(model, ids)
    handle = _apply(model, {"method": "magnitude", "structure": "2:4"})
    sparse = _logits(model, ids)
    handle.remove()
    _assert_restored(model, before)
    for lin in model.model.layers.modules():  # the reference: the same 2:4 mask, as zeros in dense weights
        if isinstance(lin, torch.nn.Linear):
            lin.weight.data.masked_fill_(~two_four_mask(lin.weight.abs().float()), 0)
    assert torch.allclose(sparse.float(), _logits(model, ids).float(), atol=5e-2)
    assert not torch.equal(sparse, dense)


# -- composition and tuning ------------------------------------------------------------------------------------------
def test_weight_and_activation_sparsity_apply_together_and_remove_cleanly(tiny):
    from transformers import DynamicCache

    from policies import apply_policy, model_fingerprint
    from policies.testing import make_policy_dict

    model = tiny.model
    ids = torch.randint(3, 2048, (1, 48), generator=torch.Generator().manual_seed(4))
    levels = [[0.4] * 4] * 6
    thresholds = calibrate_thresholds(model, [ids], [dict(zip(GROUPS, row, strict=True)) for row in levels])
    activation = {"method": "teal", "levels": levels, "thresholds": [[t[g] for g in GROUPS] for t in thresholds]}
    weights = {"method": "magnitude", "levels": [[0.5] * 4] * 6}

    def decode_step(activation_section: dict) -> torch.Tensor:
        policy = make_policy_dict(model_fingerprint(model),
                                  techniques={"sparsity": activation_section, "weight_sparsity": weights})
        with torch.inference_mode(), apply_policy(model, policy) as handle:
            assert handle.techniques == ["weight_sparsity", "sparsity"]  # weights pruned before any cache
            cache = DynamicCache(config=model.config)
            model(ids[:, :-1], **cache_arg(model, cache), use_cache=True)
            return model(ids[:, -1:], **cache_arg(model, cache), use_cache=True).logits

    before, dense = _snapshot(model), _logits(model, ids)
    masking = decode_step(activation)
    # The sparse row kernel reads the transposed weight cache made at apply time: equal only if it saw pruned weights.
    kernels = decode_step(dict(activation, kernels=[["gather_mv"] * 4] * 6))
    assert torch.allclose(kernels, masking, atol=1e-4)
    _assert_restored(model, before)
    assert torch.equal(_logits(model, ids), dense)


def test_a_wanda_policy_file_round_trips_and_applies(small, tmp_path):
    from policies import apply_policy, load_policy_file, model_fingerprint, policy_from_dict, save_policy
    from policies.testing import make_policy_dict

    section = _wanda_section(small, [[0.5] * 4] * 2, [_ids(32)])
    save_policy(policy_from_dict(make_policy_dict(model_fingerprint(small), techniques={"weight_sparsity": section})),
                tmp_path / "p.yaml")
    policy = load_policy_file(tmp_path / "p.yaml")
    assert policy.techniques["weight_sparsity"] == section
    ids, before = _ids(), _snapshot(small)
    with apply_policy(small, policy):
        pruned = _logits(small, ids)
    handle = _apply(small, section)
    assert torch.equal(_logits(small, ids), pruned)
    handle.remove()
    _assert_restored(small, before)


def test_tune_writes_a_valid_weight_sparsity_policy_with_the_presets_first(tiny, tmp_path):
    import pandas as pd

    from policies import apply_policy, load_policy_file
    from tuner.quality import QualityConfig
    from tuner.tune import TuneConfig, tune
    from tuner.workload import Workload

    result = tune(TuneConfig(model="builtin:tiny", techniques=("weight_sparsity",), budget=3, out_dir=tmp_path,
                             workload=Workload(prompt_tokens=64, new_tokens=4), repeats=1,
                             quality=QualityConfig(tasks=("pattern",), examples_per_task=3, free_text_samples=1,
                                                   free_text_chars=400)))
    section = result.policy["techniques"]["weight_sparsity"]
    assert WeightSparsityConfig.section_problems(section) == [] and len(section["levels"]) == 6
    trials = pd.read_csv(result.artefacts_dir / "trials.csv")
    assert list(trials["preset"][:2]) == ["weight_sparsity:wanda-50", "weight_sparsity:magnitude-50"]
    before = _snapshot(tiny.model)
    with apply_policy(tiny.model, load_policy_file(result.policy_path)):
        assert bool((tiny.model.model.layers[0].mlp.down_proj.weight == 0).any())
    _assert_restored(tiny.model, before)
