"""Token retention through the tuner on builtin:tiny: the written policy's recorded quality is what the
runtime reproduces when the policy is applied again (outputs change only within the measured quality)."""

from __future__ import annotations

import pytest
import torch

from policies import apply_policy, load_policy
from tuner.models import load_model
from tuner.quality import QualityConfig, QualityHarness
from tuner.tune import TuneConfig, tune
from tuner.workload import Workload

QUALITY = QualityConfig(tasks=("needle",), examples_per_task=4, free_text_samples=1, free_text_chars=600)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    result = tune(TuneConfig(model="builtin:tiny", techniques=("token_retention",), budget=3, objective="ttft_ms",
                             out_dir=out, workload=Workload(prompt_tokens=256, new_tokens=2), quality=QUALITY,
                             repeats=1))
    return out, result


def test_tune_writes_a_valid_policy_with_presets_measured(tuned):
    out, result = tuned
    assert result.n_trials == 3
    section = result.policy["techniques"]["token_retention"]
    assert len(section["keep"]) == 6 and section["keep"][0] == 1.0
    import pandas as pd

    trials = pd.read_csv(result.artefacts_dir / "trials.csv")
    assert list(trials["preset"][:3]) == ["token_retention:fastv", "token_retention:pmod",
                                          "token_retention:pyramiddrop"]
    assert trials["kv_cache_mb"].notna().all()


def test_applied_policy_reproduces_its_recorded_quality(tuned):
    out, result = tuned
    loaded = load_model("builtin:tiny")
    policy = load_policy(out, loaded.model, strict=True)
    harness = QualityHarness(loaded.model, loaded.tokenizer, QUALITY)
    with apply_policy(loaded.model, policy) as handle:
        report = harness.evaluate(handle.generate, handle)
    assert report.accuracy == pytest.approx(policy.measured["tuned"]["quality"], abs=1e-3)
    # and the model is dense again afterwards
    ids = loaded.tokenizer("def f(x):\n    return", return_tensors="pt").input_ids
    with torch.inference_mode():
        again = loaded.model(ids).logits
    fresh = load_model("builtin:tiny").model
    with torch.inference_mode():
        assert torch.equal(again, fresh(ids).logits)
