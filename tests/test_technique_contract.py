"""The plug-in contract, once, over every technique in the table (the five shipped ones and the test toy).

Each technique must: be registered with both faces under its key, in modules named after it; describe its
section with a config class whose JSON Schema accepts its sections and refuses unknown keys; have presets and
sampled sections that validate and round-trip through a policy file; apply and remove bit-identically (logits and
``state_dict``), a second ``remove()`` doing nothing; roll back when a later technique of the policy fails; and
refuse a model of the other kind. Per-technique test files test only what is specific to their technique.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from policies import PolicyError, apply_policy, load_policy_file, policy_from_dict, save_policy
from policies.config import TechniqueConfig
from policies.fingerprint import model_fingerprint
from policies.model_kind import model_kind
from policies.registry import (
    BUILTIN_TECHNIQUES,
    TECHNIQUES,
    FunctionHandle,
    TechniqueRuntime,
    get_runtime,
    register_runtime,
    registered_runtimes,
    unregister_runtime,
)
from policies.testing import make_policy_dict
from search_spaces import SearchContext, get_search_space, registered_search_spaces
from tests import toy_technique
from tuner.models import default_draft_model, load_model
from tuner.workload import TunerInputs

jsonschema = pytest.importorskip("jsonschema")

FIXTURES = Path(__file__).parent / "fixtures" / "policies_v1"
COMMITTED_SCHEMA = json.loads((Path(__file__).parents[1] / "policies" / "policy.schema.json").read_text())
TOY = toy_technique.NAME
ALL = [*BUILTIN_TECHNIQUES, TOY]
#: The kind of model each technique applies to (the toy is a causal-LM technique).
MODEL_OF = {name: "builtin:tiny" for name in ALL} | {"diffusion_blocks": "builtin:tiny-mdm"}
OTHER_MODEL = {"builtin:tiny": "builtin:tiny-mdm", "builtin:tiny-mdm": "builtin:tiny"}


def _example_section(name: str) -> dict[str, Any]:
    """A real section of the technique: the one in the policy file an older main wrote (the toy: a factor)."""
    if name == TOY:
        return {"factor": 0.5}
    return yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())["techniques"][name]


@pytest.fixture(scope="module", autouse=True)
def _toy() -> None:
    toy_technique.register()


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {spec: load_model(spec) for spec in ("builtin:tiny", "builtin:tiny-mdm")}


@pytest.fixture(scope="module")
def contexts(models: dict[str, Any]) -> dict[str, SearchContext]:
    """Per technique, a search context prepared the way `tune` prepares one (short workload, real inputs)."""
    out = {}
    for name in ALL:
        loaded = models[MODEL_OF[name]]
        ctx = SearchContext(model_fingerprint=model_fingerprint(loaded.model), device={"id": "cpu", "kind": "cpu"},
                            workload={"batch_size": 1, "prompt_tokens": 96, "new_tokens": 8, "dtype": "float32"},
                            model_id=loaded.model_id, draft_model=default_draft_model(loaded.model_id),
                            model=loaded.model, tokenizer=loaded.tokenizer, inputs=TunerInputs())
        space = get_search_space(name)
        ctx.prepared[name] = space.prepare(ctx, loaded.model, loaded.tokenizer, torch.device("cpu"))
        out[name] = ctx
    return out


def _policy(loaded: Any, sections: dict[str, Any]) -> Any:
    return policy_from_dict(make_policy_dict(model_fingerprint(loaded.model), model_id=loaded.model_id,
                                             techniques=sections))


def _snapshot(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, ...], Any]:
    """Logits, a copy of every tensor of the state dict, hook counts per module, attention implementation."""
    with torch.no_grad():
        logits = model(ids).logits.clone()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = tuple(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return logits, state, hooks, getattr(model.config, "_attn_implementation", None)


def _assert_restored(model: Any, ids: torch.Tensor, before: tuple[Any, ...]) -> None:
    logits, state, hooks, attn = _snapshot(model, ids)
    assert torch.equal(logits, before[0])
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert hooks == before[2]
    assert attn == before[3]


def _assert_round_trip(config_class: type[TechniqueConfig], section: dict[str, Any]) -> None:
    """section -> config -> section loses nothing but values equal to their defaults, and loads back equal."""
    config = config_class.from_section(section)
    written = config_class.from_section(config.to_section())
    assert written == config
    defaults = config_class.defaults()
    for key, value in section.items():
        if key not in config.to_section():
            assert value == defaults[key], (key, value)


def _prompt(loaded: Any) -> torch.Tensor:
    return TunerInputs().timing_ids(loaded.tokenizer, 96, torch.device("cpu"))


# -------------------------------------------------------------------------------------------------- the faces


def test_every_technique_in_the_table_has_both_faces_named_after_its_key() -> None:
    keys = [t.key for t in TECHNIQUES]
    assert len(set(keys)) == len(keys)
    assert set(ALL) <= set(keys)
    runtimes, spaces = registered_runtimes(), registered_search_spaces()
    for technique in TECHNIQUES:
        runtime, space = runtimes[technique.key], spaces[technique.key]
        assert type(runtime).__module__ == technique.runtime_module
        assert type(space).__module__ == technique.search_space_module
        assert issubclass(runtime.config_class, TechniqueConfig)
        assert runtime.config_class.technique == technique.key
        assert runtime.config_class.__module__ == technique.runtime_module
    for key in BUILTIN_TECHNIQUES:
        technique = next(t for t in TECHNIQUES if t.key == key)
        assert (technique.runtime_module, technique.search_space_module) == (f"policies.{key}", f"search_spaces.{key}")


def test_adding_the_toy_takes_its_two_modules_and_one_table_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its table line the toy is unknown to both registries; with it (and nothing else) it is found."""
    import sys

    import search_spaces
    from policies import registry

    table = [t for t in TECHNIQUES if t.key != TOY]
    monkeypatch.setattr(registry, "TECHNIQUES", table)
    monkeypatch.delitem(registry._RUNTIMES._items, TOY, raising=False)
    monkeypatch.delitem(search_spaces._SPACES._items, TOY, raising=False)
    monkeypatch.setattr(registry._RUNTIMES, "_imported", set())
    monkeypatch.setattr(search_spaces._SPACES, "_imported", set())
    for module in ("tests.toy_policy", "tests.toy_search_space"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(KeyError, match="unknown technique 'norm_scale'"):
        get_runtime(TOY)
    with pytest.raises(ValueError, match="unknown technique 'norm_scale'"):
        get_search_space(TOY)
    table.append(toy_technique.TOY)  # the one line
    assert get_runtime(TOY).name == TOY and get_search_space(TOY).name == TOY


# ------------------------------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("name", ALL)
def test_config_class_is_the_schema(name: str) -> None:
    runtime = get_runtime(name)
    config_class = runtime.config_class
    section = _example_section(name)
    schema = runtime.json_schema()
    assert schema["additionalProperties"] is False and schema["properties"]
    assert set(schema["properties"]) == {f.name for f in config_class.config_fields()}
    assert set(config_class.defaults()) == set(schema["properties"]) - set(schema.get("required", []))
    if name in BUILTIN_TECHNIQUES:  # the committed policy.schema.json describes exactly this section
        assert COMMITTED_SCHEMA["properties"]["techniques"]["properties"][name] == schema
    jsonschema.validate(section, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**section, "bogus": 1}, schema)
    path = f"techniques.{name}"
    assert runtime.validate(section, path) == []
    assert runtime.validate({**section, "bogus": 1}, path) == [
        f"{path}.bogus: unknown field (known: {', '.join(schema['properties'])})"]
    assert runtime.validate([section], path) == [f"{path}: must be a mapping, got list"]
    _assert_round_trip(config_class, section)
    assert runtime.config_of(config_class.from_section(section)) == config_class.from_section(section)


@pytest.mark.parametrize("name", ALL)
def test_presets_and_sampled_sections_validate_and_round_trip_through_a_file(
        name: str, contexts: dict[str, SearchContext], models: dict[str, Any], tmp_path: Path) -> None:
    ctx, space, runtime = contexts[name], get_search_space(name), get_runtime(name)
    loaded = models[MODEL_OF[name]]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = [(f"sampled {i}", space.suggest(study.ask(), ctx)) for i in range(6)]  # several branches of the space
    sections = [(p.name, p.section) for p in space.presets(ctx)] + sampled
    assert len(sections) > len(sampled), f"{name} has no preset"
    schema = runtime.json_schema()
    for label, section in sections:
        assert runtime.validate(section, f"techniques.{name}") == [], (label, section)
        jsonschema.validate(section, schema)
        _assert_round_trip(runtime.config_class, section)
        policy = _policy(loaded, {name: section})
        save_policy(policy, tmp_path / "p.yaml")
        assert load_policy_file(tmp_path / "p.yaml").techniques[name] == section, label


# -------------------------------------------------------------------------------------------- apply / remove


@pytest.mark.parametrize("name", ALL)
def test_apply_then_remove_is_bit_identical_and_remove_is_idempotent(name: str, models: dict[str, Any]) -> None:
    loaded = models[MODEL_OF[name]]
    model, ids = loaded.model, _prompt(loaded)
    before = _snapshot(model, ids)
    handle = apply_policy(model, _policy(loaded, {name: _example_section(name)}))
    assert handle.techniques == [name]
    out = handle.generate(ids, max_new_tokens=4)
    assert out.shape[1] == ids.shape[1] + 4
    handle.remove()
    _assert_restored(model, ids, before)
    handle.remove()  # a second remove does nothing
    _assert_restored(model, ids, before)


class _FailingRuntime(TechniqueRuntime):
    """Applied after every other technique (order 999), it fails: the others must be rolled back."""

    name = "contract_fails"
    order = 999
    config_class = TechniqueConfig  # no fields: validate is overridden below
    model_kinds = ("causal-lm", "masked-diffusion")

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return []

    def apply(self, model: Any, config: Any) -> FunctionHandle:
        raise RuntimeError("contract: apply failed on purpose")


@pytest.mark.parametrize("name", ALL)
def test_a_failed_apply_rolls_back(name: str, models: dict[str, Any]) -> None:
    loaded = models[MODEL_OF[name]]
    model, ids = loaded.model, _prompt(loaded)
    before = _snapshot(model, ids)
    register_runtime(_FailingRuntime())
    try:
        with pytest.raises(RuntimeError, match="failed on purpose"):
            apply_policy(model, _policy(loaded, {name: _example_section(name), "contract_fails": {}}))
    finally:
        unregister_runtime("contract_fails")
    _assert_restored(model, ids, before)


@pytest.mark.parametrize("name", ALL)
def test_a_section_for_the_other_model_kind_is_refused(name: str, models: dict[str, Any]) -> None:
    other = models[OTHER_MODEL[MODEL_OF[name]]]
    model, ids = other.model, _prompt(other)
    before = _snapshot(model, ids)
    kind = model_kind(model)
    assert kind not in get_runtime(name).model_kinds
    with pytest.raises(PolicyError, match=f"{name}: applies to .* not to this {kind}"):
        apply_policy(model, _policy(other, {name: copy.deepcopy(_example_section(name))}))
    _assert_restored(model, ids, before)
