"""Speculative decoding through the tuner: a valid per-device policy (alone and with token retention), the
cost model's prediction recorded, and the lossless guard failing a trial whose greedy output changed."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from policies import apply_policy, load_policy
from tuner.models import load_model
from tuner.quality import QualityConfig
from tuner.tune import TuneConfig, tune
from tuner.workload import Workload

QUALITY = QualityConfig(tasks=("pattern",), examples_per_task=3, free_text_samples=0)
WORKLOAD = Workload(prompt_tokens=96, new_tokens=12)


def _assert_reproduces_dense(loaded, policy) -> None:
    """The policy's generate gives dense greedy output on a pattern prompt."""
    ids = loaded.tokenizer("cycle: red gold red gold |", return_tensors="pt").input_ids
    with torch.inference_mode():
        dense = loaded.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                                      attention_mask=torch.ones_like(ids))
        with apply_policy(loaded.model, policy) as handle:
            assert torch.equal(handle.generate(ids, max_new_tokens=12, min_new_tokens=12), dense)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    result = tune(TuneConfig(model="builtin:tiny", techniques=("speculative",), budget=4, objective="tokens_per_s",
                             out_dir=out, workload=WORKLOAD, quality=QUALITY, repeats=1))
    return out, result


def test_tune_writes_a_speculative_policy_that_run_reproduces(tuned):
    out, result = tuned
    assert result.n_trials == 4
    section = result.policy["techniques"]["speculative"]
    assert section["drafter"] in ("draft_model", "layer_skip", "prompt_lookup")
    trials = pd.read_csv(result.artefacts_dir / "trials.csv")
    # The hardware-aware Sequoia seed and gpt-fast's chain come first; every trial has a cost-model prediction,
    # and every measured one its error (a trial predicted far slower than the incumbent is ruled out unmeasured).
    assert list(trials["preset"][:2]) == ["speculative:sequoia-hw", "speculative:chain-k5"]
    assert trials["predicted_ms"].notna().all()
    measured = trials[trials["state"] == "COMPLETE"]
    assert len(measured) >= 1 and measured["prediction_error"].notna().all()  # the first: no incumbent yet
    assert trials.loc[trials["state"] == "PRUNED", "latency_ms"].isna().all()
    assert (result.artefacts_dir / "speculative-verify.csv").is_file()
    loaded = load_model("builtin:tiny")
    policy = load_policy(out, loaded.model, strict=True)
    _assert_reproduces_dense(loaded, policy)


def test_token_retention_and_speculative_tune_together(tmp_path):
    result = tune(TuneConfig(model="builtin:tiny", techniques=("token_retention", "speculative"), budget=2,
                             objective="latency_ms", out_dir=tmp_path, workload=WORKLOAD, quality=QUALITY,
                             repeats=1))
    assert set(result.policy["techniques"]) == {"token_retention", "speculative"}


def test_lossless_guard_fails_trials_that_change_greedy_output(tmp_path, monkeypatch):
    """With a broken (lossy) acceptance rule every trial changes the greedy output, so every trial fails and
    no policy is written."""
    from policies import speculative

    def accept_first_child(draft, rows, sampling, generator):
        first = next((i for i, p in enumerate(draft.parents) if p == -1), None)
        return ([first] if first is not None else []), int(rows[0].argmax())

    monkeypatch.setattr(speculative, "_accept", accept_first_child)
    with pytest.raises(RuntimeError, match="no completed trial"):
        tune(TuneConfig(model="builtin:tiny", techniques=("speculative",), budget=2, out_dir=tmp_path,
                        workload=WORKLOAD, quality=QUALITY, repeats=1))
    assert not list(tmp_path.rglob("*.yaml"))


def test_tune_with_a_draft_head_starts_from_the_eagle_presets(tmp_path):
    """A random EAGLE head for builtin:tiny (`--draft-head DIR`): the eagle presets run first, each predicted by
    the simulated cost model, and the written policy reproduces dense greedy output."""
    from policies.draft_heads import EagleHead, save_head
    from tuner.builtin.train_eagle import vocab_rank

    loaded = load_model("builtin:tiny")
    torch.manual_seed(0)
    head = EagleHead(loaded.model.config)
    head.vocab_rank = vocab_rank([[1, 2, 2, 3]], loaded.model.config.vocab_size)
    save_head(head, tmp_path / "head", loaded.model.config)
    result = tune(TuneConfig(model="builtin:tiny", techniques=("speculative",), budget=3, objective="tokens_per_s",
                             out_dir=tmp_path / "store", workload=WORKLOAD, quality=QUALITY, repeats=1,
                             draft_head=str(tmp_path / "head")))
    trials = pd.read_csv(result.artefacts_dir / "trials.csv")
    assert list(trials["preset"][:3]) == ["speculative:eagle-hw", "speculative:eagle2-default",
                                          "speculative:sglang-eagle"]
    assert trials["predicted_ms"].notna().all()
    section = result.policy["techniques"]["speculative"]
    assert section["drafter"] == "eagle" and section["eagle"]["head"] == str(tmp_path / "head")
    policy = load_policy(tmp_path / "store", loaded.model, strict=True)
    _assert_reproduces_dense(loaded, policy)
