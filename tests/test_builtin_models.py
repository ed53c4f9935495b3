"""The committed ``builtin:tiny`` checkpoint: registry, loading, config, tokenizer, task accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tuner import tasks
from tuner.builtin import (
    BUILTIN_MODELS,
    BuiltinModel,
    builtin_checkpoint,
    get_builtin_model,
    list_builtin_models,
)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_checkpoint("builtin:tiny")
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def test_registry():
    assert "tiny" in BUILTIN_MODELS
    entry = get_builtin_model("builtin:tiny")
    assert isinstance(entry, BuiltinModel) and entry.kind == "causal-lm" and entry.spec == "builtin:tiny"
    assert entry in list_builtin_models()
    assert builtin_checkpoint("tiny") == builtin_checkpoint("builtin:tiny") == entry.checkpoint
    assert entry.train_command == "python -m tuner.builtin.train_tiny OUT_DIR"
    for bad in ("nope", "builtin:nope"):
        with pytest.raises(KeyError) as err:
            builtin_checkpoint(bad)
        assert isinstance(err.value, ValueError)
        msg = str(err.value)
        assert "\n" not in msg and "builtin:tiny" in msg and bad in msg


def test_checkpoint_files_and_size():
    path = builtin_checkpoint("tiny")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "train_meta.json"):
        assert (path / name).is_file(), name
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    assert total <= 25 * 1024 * 1024


def test_config_and_parameters(tiny):
    model, _ = tiny
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (6, 256, 688)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == 2048 and cfg.tie_word_embeddings
    assert cfg.max_position_embeddings >= 4096
    n = sum(p.numel() for p in model.parameters())
    assert 4.8e6 < n < 5.0e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_tokenizer_round_trip_and_specials(tiny):
    _, tok = tiny
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    texts = [e.prompt + e.answer for name in ("retrieval", "pattern") for e in tasks.get_task(name).examples(3, 0)]
    texts += tasks.code_samples(3, seed=0, n_chars=1000)
    texts += ["  x = [1, 2]  # ok .  \n\tdef f(a , b) :\n", "héllo → ünïcode ✓", "a\r\nb"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    digits = tok.convert_ids_to_tokens(tok("x = 90210", add_special_tokens=False)["input_ids"])
    assert digits[-5:] == ["9", "0", "2", "1", "0"]


def _greedy_correct(model, tok, task, examples) -> int:
    correct = 0
    with torch.no_grad():
        for ex in examples:
            enc = tok(ex.prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += int(task.score(text, ex.answer))
    return correct


def test_greedy_needle_accuracy_at_1k_and_2k_tokens(tiny):
    model, tok = tiny
    for name, min_tokens in (("needle", 1000), ("needle-2k", 2000)):
        task = tasks.get_task(name)
        examples = task.examples(20, seed=1)
        assert min(len(tok(e.prompt)["input_ids"]) for e in examples) >= min_tokens
        assert _greedy_correct(model, tok, task, examples) >= 18, name  # >= 90% exact match


def test_greedy_pattern_accuracy(tiny):
    model, tok = tiny
    task = tasks.get_task("pattern")
    assert _greedy_correct(model, tok, task, task.examples(20, seed=0)) >= 17


def test_code_loss_better_than_uniform(tiny):
    model, tok = tiny
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for text in tasks.code_samples(3, seed=0, n_chars=1500):
            ids = tok(text, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            tot += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            cnt += ids.shape[1] - 1
    assert tot / cnt < 0.5 * math.log(model.config.vocab_size)


def test_tiny_draft_shares_the_tokenizer_and_is_a_cheaper_model(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_checkpoint("builtin:tiny-draft")
    draft = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    target_tok = AutoTokenizer.from_pretrained(builtin_checkpoint("tiny"), local_files_only=True)
    assert tok.get_vocab() == target_tok.get_vocab()
    assert draft.config.vocab_size == 2048 and draft.config.num_hidden_layers == 2
    n_draft = sum(p.numel() for p in draft.parameters())
    n_target = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(builtin_checkpoint("tiny")).parameters())
    assert n_draft < n_target / 5
    meta = json.loads((path / "train_meta.json").read_text())
    assert meta["command"] == get_builtin_model("tiny-draft").train_command
