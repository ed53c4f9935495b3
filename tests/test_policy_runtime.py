"""apply_policy: techniques compose in a fixed order, remove() restores the model bit-identically,
a failed apply rolls back, and a dense handle generates exactly what model.generate does."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from policies import (
    FunctionHandle,
    PolicyError,
    TechniqueHandle,
    TechniqueRuntime,
    apply_policy,
    fingerprint_mismatches,
    model_fingerprint,
    policy_from_dict,
    register_runtime,
)
from policies.registry import DEFAULT_ORDER, get_runtime, registered_runtimes, unregister_runtime
from policies.testing import make_policy_dict, tiny_llama

CALLS: list[str] = []


class ScaleNormRuntime(TechniqueRuntime):
    """Test-only technique: scales the final norm weight by ``factor``; restores the saved copy."""

    name = "test_scale_norm"
    order = 10  # a weight edit: runs before hook-based techniques

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        factor = section.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 4:
            return [f"{path}.factor: must be a number in (0, 4], got {factor!r}"]
        return []

    def apply(self, model: Any, section: dict[str, Any]) -> TechniqueHandle:
        CALLS.append(f"apply {self.name}")
        norm = model.model.norm
        saved = norm.weight.detach().clone()
        norm.weight.data.mul_(float(section["factor"]))

        def undo() -> None:
            CALLS.append(f"remove {self.name}")
            norm.weight.data.copy_(saved)

        return FunctionHandle(undo)


class AddToLayerRuntime(TechniqueRuntime):
    """Test-only hook technique: adds ``delta`` to layer 0's output through a forward hook."""

    name = "test_add_hook"

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return [] if isinstance(section.get("delta"), float) else [f"{path}.delta: must be a float"]

    def apply(self, model: Any, section: dict[str, Any]) -> TechniqueHandle:
        CALLS.append(f"apply {self.name}")
        delta = section["delta"]

        def hook(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        hook_handle = model.model.layers[0].register_forward_hook(hook)

        def undo() -> None:
            CALLS.append(f"remove {self.name}")
            hook_handle.remove()

        return FunctionHandle(undo)


class FailingRuntime(TechniqueRuntime):
    name = "test_failing"
    order = DEFAULT_ORDER + 50  # applied after the two above, so they must be rolled back

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return []

    def apply(self, model: Any, section: dict[str, Any]) -> TechniqueHandle:
        CALLS.append(f"apply {self.name}")
        raise RuntimeError("cannot apply test_failing")


class LoopHandle(TechniqueHandle):
    def __init__(self) -> None:
        self.removed = False
        self.seen: dict[str, Any] = {}

    def remove(self) -> None:
        self.removed = True

    def generate(self, model: Any, input_ids: Any, **kwargs: Any) -> Any:
        self.seen = dict(kwargs)
        return ("looped", input_ids.shape)


class LoopRuntime(TechniqueRuntime):
    name = "test_loop"
    order = 200
    owns_generate = True
    last: LoopHandle | None = None

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return []

    def apply(self, model: Any, section: dict[str, Any]) -> TechniqueHandle:
        LoopRuntime.last = LoopHandle()
        return LoopRuntime.last


RUNTIMES = [ScaleNormRuntime(), AddToLayerRuntime(), FailingRuntime(), LoopRuntime()]


@pytest.fixture(autouse=True, scope="module")
def _register():
    for rt in RUNTIMES:
        register_runtime(rt, replace=True)
    yield
    for rt in RUNTIMES:
        unregister_runtime(rt.name)


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def _tiny(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(seed, layers)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _tiny()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))


def _policy(model: Any, techniques: dict[str, Any]) -> Any:
    return policy_from_dict(make_policy_dict(model_fingerprint(model), techniques=techniques))


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- registry


def test_registry_lookup_and_duplicates():
    assert get_runtime("test_scale_norm") is RUNTIMES[0]
    assert list(registered_runtimes()) == sorted(registered_runtimes())
    with pytest.raises(KeyError, match=r"unknown technique 'nope' \(known: .*test_scale_norm"):
        get_runtime("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_runtime(ScaleNormRuntime())
    with pytest.raises(ValueError, match="identifier"):
        register_runtime(type("Bad", (ScaleNormRuntime,), {"name": "has space"})())


# ------------------------------------------------------------------------------------ apply/remove


def test_apply_remove_restores_logits_bit_identically(model: LlamaForCausalLM, input_ids: torch.Tensor):
    dense, state = _logits(model, input_ids), _state(model)
    policy = _policy(model, {"test_scale_norm": {"factor": 0.5}, "test_add_hook": {"delta": 0.25}})
    handle = apply_policy(model, policy)
    tuned = _logits(model, input_ids)
    assert not torch.equal(tuned, dense)
    assert torch.equal(handle(input_ids).logits, tuned)  # __call__ forwards to the model
    handle.remove()
    assert torch.equal(_logits(model, input_ids), dense)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    handle.remove()  # idempotent
    assert CALLS.count("remove test_scale_norm") == 1


def test_techniques_compose_in_documented_order_not_file_order(model: LlamaForCausalLM):
    # File order: hook first; documented order: (order, name) -> scale_norm (10) before add_hook (100).
    policy = _policy(model, {"test_add_hook": {"delta": 0.25}, "test_scale_norm": {"factor": 0.5}})
    with apply_policy(model, policy) as handle:
        assert handle.techniques == ["test_scale_norm", "test_add_hook"]
    assert CALLS == ["apply test_scale_norm", "apply test_add_hook", "remove test_add_hook",
                     "remove test_scale_norm"]


def test_composition_equals_sequential_application(model: LlamaForCausalLM, input_ids: torch.Tensor):
    both = _policy(model, {"test_scale_norm": {"factor": 2.0}, "test_add_hook": {"delta": 0.5}})
    with apply_policy(model, both):
        combined = _logits(model, input_ids)
    with apply_policy(model, _policy(model, {"test_scale_norm": {"factor": 2.0}})):
        with apply_policy(model, _policy(model, {"test_add_hook": {"delta": 0.5}})):
            nested = _logits(model, input_ids)
    assert torch.equal(combined, nested)


def test_failed_apply_rolls_back_earlier_techniques(model: LlamaForCausalLM, input_ids: torch.Tensor):
    dense = _logits(model, input_ids)
    policy = _policy(model, {"test_failing": {}, "test_scale_norm": {"factor": 3.0}, "test_add_hook": {"delta": 1.0}})
    with pytest.raises(RuntimeError, match="cannot apply test_failing"):
        apply_policy(model, policy)
    assert CALLS == ["apply test_scale_norm", "apply test_add_hook", "apply test_failing",
                     "remove test_add_hook", "remove test_scale_norm"]
    assert torch.equal(_logits(model, input_ids), dense)


def test_context_manager_removes_on_exception(model: LlamaForCausalLM, input_ids: torch.Tensor):
    dense = _logits(model, input_ids)
    with pytest.raises(ZeroDivisionError):
        with apply_policy(model, _policy(model, {"test_scale_norm": {"factor": 0.5}})) as tuned:
            assert tuned.model is model and tuned.policy is not None
            _ = 1 / 0
    assert torch.equal(_logits(model, input_ids), dense)
    assert not tuned.active
    with pytest.raises(RuntimeError, match="removed"):
        tuned.generate(input_ids, max_new_tokens=2)


def test_policy_for_another_model_is_refused(model: LlamaForCausalLM):
    other = _tiny(layers=3)
    policy = _policy(other, {"test_scale_norm": {"factor": 0.5}})
    with pytest.raises(PolicyError, match="policy is for another model: num_layers 3 != 2"):
        apply_policy(model, policy)
    assert CALLS == []


def test_invalid_section_built_in_python_is_refused_before_touching_the_model(model: LlamaForCausalLM):
    policy = _policy(model, {"test_scale_norm": {"factor": 0.5}})
    policy.techniques["test_scale_norm"]["factor"] = -1
    with pytest.raises(PolicyError, match=r"techniques\.test_scale_norm\.factor: must be a number"):
        apply_policy(model, policy)
    assert CALLS == []


def test_apply_accepts_a_plain_mapping(model: LlamaForCausalLM):
    with apply_policy(model, make_policy_dict(model_fingerprint(model))) as handle:
        assert handle.techniques == []


# ------------------------------------------------------------------------------------------ generate


def test_dense_handle_generate_equals_model_generate(model: LlamaForCausalLM, input_ids: torch.Tensor):
    expected = model.generate(input_ids, max_new_tokens=10, do_sample=False)
    for policy in (None, _policy(model, {})):
        with apply_policy(model, policy) as dense:
            assert dense.techniques == []
            assert torch.equal(dense.generate(input_ids, max_new_tokens=10), expected)


def test_dense_handle_passes_generation_kwargs_through(model: LlamaForCausalLM):
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": 3}
    expected = model.generate(ids, do_sample=False, **kwargs)
    with apply_policy(model, None) as dense:
        assert torch.equal(dense.generate(ids, **kwargs), expected)
        out = dense.generate(ids, return_dict_in_generate=True, output_scores=True, **kwargs)
        assert torch.equal(out.sequences, expected)
        assert torch.equal(dense.generate(input_ids=ids, **kwargs), expected)


def test_tuned_generate_uses_the_modified_model(model: LlamaForCausalLM, input_ids: torch.Tensor):
    policy = _policy(model, {"test_scale_norm": {"factor": 0.5}, "test_add_hook": {"delta": 3.0}})
    with apply_policy(model, policy) as tuned:
        out = tuned.generate(input_ids, max_new_tokens=6)
        assert torch.equal(out, model.generate(input_ids, max_new_tokens=6, do_sample=False))


def test_decode_loop_owner_gets_generate_with_greedy_default(model: LlamaForCausalLM, input_ids: torch.Tensor):
    policy = _policy(model, {"test_loop": {}, "test_scale_norm": {"factor": 0.5}})
    with apply_policy(model, policy) as handle:
        assert handle.generate(input_ids, max_new_tokens=4, eos_token_id=3) == ("looped", input_ids.shape)
        loop = LoopRuntime.last
        assert loop is not None and loop.seen == {"max_new_tokens": 4, "eos_token_id": 3, "do_sample": False}
    assert loop.removed


def test_two_decode_loop_owners_are_refused(model: LlamaForCausalLM):
    second = LoopRuntime()
    second.name = "test_loop_two"
    register_runtime(second)
    try:
        d = make_policy_dict(model_fingerprint(model), techniques={"test_loop": {}, "test_loop_two": {}})
        with pytest.raises(PolicyError, match="at most one technique may own the decode loop"):
            policy_from_dict(d)
    finally:
        unregister_runtime("test_loop_two")


# --------------------------------------------------------------------------------------- fingerprint


def test_model_fingerprint_fields(model: LlamaForCausalLM):
    fp = model_fingerprint(model)
    assert fp == {
        "architecture": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "dtype": "float32",
        "weights_digest": fp["weights_digest"],
    }
    assert len(fp["weights_digest"]) == 16 and int(fp["weights_digest"], 16) >= 0


def test_weights_digest_tells_weights_apart_but_not_dtypes(model: LlamaForCausalLM):
    fp = model_fingerprint(model)
    assert model_fingerprint(_tiny(seed=0)) == fp  # deterministic
    other = model_fingerprint(_tiny(seed=1))
    assert fingerprint_mismatches(fp, other) == [f"weights_digest {fp['weights_digest']} != {other['weights_digest']}"]
    for dtype in (torch.bfloat16, torch.float16):
        low = _tiny(seed=0).to(dtype)
        low_fp = model_fingerprint(low)
        assert low_fp["dtype"] == str(dtype).removeprefix("torch.")
        assert fingerprint_mismatches(fp, low_fp) == []  # same weights, another dtype: same model


def test_fingerprint_is_cheap(model: LlamaForCausalLM):
    model_fingerprint(model)
    start = time.perf_counter()
    for _ in range(20):
        model_fingerprint(model)
    assert (time.perf_counter() - start) / 20 < 0.010


def test_gpt2_style_config_fingerprint():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    fp = model_fingerprint(gpt2)
    assert (fp["architecture"], fp["num_layers"], fp["hidden_size"]) == ("gpt2", 2, 32)
    assert (fp["num_attention_heads"], fp["num_key_value_heads"], fp["intermediate_size"]) == (4, 4, 128)
