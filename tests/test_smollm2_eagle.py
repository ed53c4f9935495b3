"""The committed EAGLE head for builtin:smollm2-135m: registered, small, refused as a model, and lossless on the
real model (the one real-model check: a head is only meaningful on its target)."""

from __future__ import annotations

import json

import pytest
import torch

from tuner.builtin import builtin_checkpoint, get_builtin_model
from tuner.cli import main

HEAD = "builtin:smollm2-135m-eagle"


def test_the_head_is_registered_committed_and_small(capsys) -> None:
    entry = get_builtin_model(HEAD)
    assert entry.kind == "draft-head" and entry.train_command == "python -m tuner.builtin.train_eagle"
    path = builtin_checkpoint(HEAD)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in path.iterdir()) <= 20 * 2**20
    meta = json.loads((path / "train_meta.json").read_text())
    assert meta["target"] == "builtin:smollm2-135m" and len(meta["heldout_eval"]["acceptance_by_depth"]) == 5
    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[HEAD]["kind"] == "draft-head"


def test_running_the_head_as_a_model_is_one_line_and_exit_2(capsys) -> None:
    assert main(["run", "--model", HEAD, "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert out == "" and len(lines) == 1 and "is a draft head" in lines[0] and "Traceback" not in err


@pytest.mark.slow
def test_the_committed_head_is_lossless_and_accepts_on_the_real_model() -> None:
    from policies.registry import get_runtime
    from tuner.models import load_model
    from tuner.tasks import get_task, prompt_ids

    loaded = load_model("builtin:smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    section = {"drafter": "eagle", "eagle": {"head": HEAD, "vocab": 8192},
               "tree": {"kind": "dynamic", "depth": 4, "topk": 2, "tokens": 6}}
    handle = get_runtime("speculative").apply(model, section)
    accepted = []
    for example in get_task("chat").examples(2, seed=3):
        ids = prompt_ids(tokenizer, example.prompt, chat=True)
        with torch.inference_mode():
            dense = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                   attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id)
            assert torch.equal(handle.generate(model, ids, max_new_tokens=24, min_new_tokens=24), dense)
        accepted += handle.last_stats.accepted_per_step
    handle.remove()
    assert sum(accepted) / len(accepted) > 0.5  # a trained head, not a random one (those accept ~0)
