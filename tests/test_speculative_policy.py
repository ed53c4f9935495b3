"""The `speculative` policy section: validation names the bad field, YAML round trips, apply/generate/remove."""

from __future__ import annotations

import pytest
import torch

from policies import PolicyError, apply_policy, load_policy_file, policy_from_dict, save_policy
from policies.speculative import SpeculativeConfig
from policies.testing import make_policy_dict
from search_spaces import SearchContext, get_search_space
from search_spaces.speculative import rank_acceptance, tree_from_params
from tuner.models import load_model

TREE = {"kind": "static", "parents": [-1, -1, 0, 0, 2]}


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def _policy(tiny, section):
    from policies import model_fingerprint

    doc = make_policy_dict(techniques={"speculative": section})
    doc["model"] = {"id": "builtin:tiny", "fingerprint": model_fingerprint(tiny.model)}
    return doc


@pytest.mark.parametrize("section, field", [
    ({"drafter": "layer_skip", "skip_layers": [2], "tree": {"kind": "static", "parents": [-1, 2, 0]}},
     "techniques.speculative.tree.parents[1]"),  # a parent after its child
    ({"drafter": "layer_skip", "skip_layers": [2], "node_budget": 3, "tree": TREE},
     "techniques.speculative.tree.parents: 5 nodes exceed node_budget 3"),
    ({"drafter": "layer_skip", "skip_layers": [0, 1], "tree": TREE}, "techniques.speculative.skip_layers"),
    ({"drafter": "draft_model", "tree": TREE}, "techniques.speculative.draft_model"),
    ({"drafter": "medusa"}, "techniques.speculative.drafter"),
    ({"drafter": "prompt_lookup", "prompt_lookup": {"depth": 40, "candidates": 4}, "node_budget": 64},
     "techniques.speculative.prompt_lookup: depth x candidates = 160"),
    ({"drafter": "prompt_lookup", "prompt_lookup": {"max_ngram": 1, "min_ngram": 2}},
     "techniques.speculative.prompt_lookup.min_ngram"),
    ({"drafter": "draft_model", "draft_model": "builtin:tiny-draft",
      "tree": {"kind": "dynamic", "depth": 2, "topk": 2, "tokens": 9}}, "techniques.speculative.tree.tokens"),
    ({"drafter": "layer_skip", "skip_layers": [1], "tree": {"kind": "bushy"}}, "techniques.speculative.tree.kind"),
    ({"drafter": "prompt_lookup", "speed": "max"}, "techniques.speculative.speed: unknown field"),
    ({"drafter": "recycle", "recycle": {"k": 1}, "tree": TREE}, "techniques.speculative.tree.parents: a node has 2"),
    ({"drafter": "recycle", "recycle": {"k": 99}, "tree": TREE}, "techniques.speculative.recycle.k"),
])
def test_malformed_sections_are_rejected_with_the_field_named(section, field):
    problems = SpeculativeConfig.section_problems(section)
    assert any(p.startswith(field) for p in problems), problems
    with pytest.raises(PolicyError, match="techniques.speculative"):
        policy_from_dict(make_policy_dict(techniques={"speculative": section}))


def test_skip_set_is_checked_against_the_model(tiny):
    doc = _policy(tiny, {"drafter": "layer_skip", "skip_layers": [6], "tree": TREE})
    with pytest.raises(PolicyError, match="skip_layers"):
        apply_policy(tiny.model, doc)


@pytest.mark.parametrize("section", [
    {"drafter": "prompt_lookup", "prompt_lookup": {"depth": 4, "candidates": 2}},
    {"drafter": "layer_skip", "skip_layers": [2, 3], "tree": TREE},
    {"drafter": "recycle", "recycle": {"k": 4}, "tree": TREE},
    {"drafter": "recycle", "recycle": {"k": 4}, "tree": TREE, "prompt_lookup": {"depth": 4}},
])
def test_policy_round_trips_through_yaml_and_generates_dense_output(tiny, tmp_path, section):
    path = tmp_path / "p.yaml"
    save_policy(policy_from_dict(_policy(tiny, section)), path)
    policy = load_policy_file(path)
    assert policy.techniques["speculative"] == section
    ids = tiny.tokenizer("cycle: red gold red gold red gold |", return_tensors="pt").input_ids
    with torch.inference_mode():
        dense = tiny.model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                                    attention_mask=torch.ones_like(ids))
        before = tiny.model(ids).logits
        with apply_policy(tiny.model, policy) as handle:
            out = handle.generate(ids, max_new_tokens=16, min_new_tokens=16)
            stats = handle.decode_owner.last_stats
        assert torch.equal(out, dense)
        assert stats.steps + stats.accepted >= 15
        assert torch.equal(tiny.model(ids).logits, before)  # the target is untouched after remove()


def test_space_samples_valid_sections_and_sequoia_uses_the_measured_acceptance(tiny):
    import optuna

    space = get_search_space("speculative")
    ctx = SearchContext(model_fingerprint={"num_layers": 6}, workload={"prompt_tokens": 64, "new_tokens": 8},
                        device={}, model_id="none")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(25):
        trial = study.ask()
        section = space.suggest(trial, ctx)
        assert SpeculativeConfig.section_problems(section) == [], section
        study.tell(trial, 0.0)
    flat, _ = tree_from_params({"speculative.shape": "sequoia", "speculative.sequoia.budget": 6,
                                "speculative.sequoia.depth": 6}, [0.45, 0.45])
    steep, _ = tree_from_params({"speculative.shape": "sequoia", "speculative.sequoia.budget": 6,
                                 "speculative.sequoia.depth": 6}, [0.95])
    assert steep == [-1, 0, 1, 2, 3, 4] and flat != steep  # a confident drafter gets a chain, an unsure one a bush


def test_rank_acceptance_of_the_target_against_itself_is_all_rank_zero(tiny):
    ids = tiny.tokenizer("copy: owl fox bear |", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = tiny.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                  attention_mask=torch.ones_like(ids))
    acc = rank_acceptance(tiny.model, [(ids[0].tolist(), out[0, ids.shape[1]:].tolist())])
    assert acc[0] == pytest.approx(1.0) and sum(acc[1:]) == 0


def test_handle_samples_with_temperature_and_top_p_reproducibly(tiny):
    section = {"drafter": "layer_skip", "skip_layers": [2, 3], "tree": TREE}
    ids = tiny.tokenizer("def f(x):\n", return_tensors="pt").input_ids
    with torch.inference_mode(), apply_policy(tiny.model, _policy(tiny, section)) as handle:
        outs = [handle.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=0.9,
                                top_p=0.95, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
        assert outs[0].shape == (1, ids.shape[1] + 12) and torch.equal(outs[0], outs[1])
        with pytest.raises(ValueError, match="unsupported arguments num_beams"):
            handle.generate(ids, max_new_tokens=4, num_beams=2)
