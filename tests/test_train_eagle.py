"""The EAGLE head recipe on builtin:tiny: deterministic first steps, exact resume, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from policies.draft_heads import load_head
from tuner.builtin import train_eagle
from tuner.builtin.train_eagle import Recipe, build_sequences, extract_features, train
from tuner.models import load_model

pytestmark = pytest.mark.hf_internals

RECIPE = Recipe(requests=2, answer_tokens=4, windows=2, window_chars=200, batch=2, steps=3, seq_per_step=1,
                warmup=1)


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def _train(tiny, work, stop_after=None):
    work.mkdir(exist_ok=True)
    sequences = build_sequences(tiny.model, tiny.tokenizer, RECIPE, work)
    data = extract_features(tiny.model, sequences, work)
    return train(tiny.model, sequences, data, RECIPE, work, None, 1, lambda record: None, stop_after)


def test_first_steps_are_deterministic_and_a_resumed_run_is_identical(tiny, tmp_path):
    head_a, done_a = _train(tiny, tmp_path / "a")
    head_b, done_b = _train(tiny, tmp_path / "b")
    assert done_a and done_b
    a, b = head_a.eagle_state_dict(), head_b.eagle_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, done = _train(tiny, tmp_path / "c", stop_after=1)  # one step, a checkpoint, then the rest
    assert not done
    head_c, done = _train(tiny, tmp_path / "c")
    assert done
    c = head_c.eagle_state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], torch.zeros_like(a[k])) for k in a)


def test_the_recipe_writes_a_head_that_loads_and_reports_acceptance(tiny, tmp_path):
    out = tmp_path / "head"
    args = ["--target", "builtin:tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--requests", "2",
            "--answer-tokens", "4", "--windows", "2", "--window-chars", "200", "--batch", "2", "--steps", "2",
            "--seq-per-step", "1", "--warmup", "1", "--eval-prompts", "1", "--threads", "1"]
    assert train_eagle.main(args) == 0
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["recipe"]["steps"] == 2 and len(meta["heldout_eval"]["acceptance_by_depth"]) == 5
    head = load_head(out, tiny.model)
    assert head.vocab_rank is not None and len(head.vocab_rank) == tiny.model.config.vocab_size


def test_another_target_needs_an_output_directory(capsys):
    with pytest.raises(SystemExit) as info:
        train_eagle.main(["--target", "builtin:tiny"])
    assert info.value.code == 2
    assert "--out is required" in capsys.readouterr().err
