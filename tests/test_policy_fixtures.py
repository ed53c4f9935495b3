"""Policy files written by an older main still load, validate and generate the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from policies import apply_policy, load_policy_file, policy_to_dict
from tuner.models import load_model

# Applies every technique to real models: CI also runs it on the oldest supported transformers.
pytestmark = pytest.mark.hf_internals

FIXTURES = Path(__file__).parent / "fixtures" / "policies_v1"
EXPECTED = json.loads((FIXTURES / "expected_tokens.json").read_text())


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    return {name: load_model(name).model for name in ("builtin:tiny", "builtin:tiny-mdm")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_policy_file_generates_the_same_tokens(name: str, models: dict[str, object]) -> None:
    case = EXPECTED[name]
    path = FIXTURES / f"{name}.yaml"
    policy = load_policy_file(path)
    model = models[case["model"]]
    ids = torch.tensor([case["prompt"]])
    with apply_policy(model, policy) as tuned:
        kwargs = {"min_new_tokens": 16} if case["model"] == "builtin:tiny" else {}
        out = tuned.generate(ids, max_new_tokens=16, **kwargs)
        stats = tuned.last_stats.to_dict() if tuned.last_stats is not None else None
    assert out[0, ids.shape[1]:].tolist() == case["new_tokens"]
    # greedy speculation reproduces dense tokens whatever its drafter: the loop's counts show it read the same tree
    for key in ("speculative", "diffusion"):
        if key in case:
            assert stats is not None and {k: stats[k] for k in case[key]} == case[key]
    # and the file is still in canonical form: loading and writing it back changes nothing
    assert policy_to_dict(policy) == yaml.safe_load(path.read_text())
