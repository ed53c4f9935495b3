"""Net2Net widening (`tuner.builtin.widen`) and the generated `builtin:tiny-wide` registry entry.

Factor 2 stands in for tiny-wide's factor 4 (same code path, a quarter of the size): the real model is
~280 MB and never generated here.
"""

from __future__ import annotations

import json

import pytest
import torch

from tuner import tasks
from tuner.builtin import builtin_checkpoint, cache_root, get_builtin_model, list_builtin_models, widen
from tuner.builtin.widen import materialize_wide, widen_llama
from tuner.cli import main as cli_main
from tuner.models import resolve_model_path

LOGIT_TOL = 1e-4  # max abs logit difference allowed (float rounding of the k-way sums; measured ~2e-5)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_checkpoint("tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def wide2(tiny):
    return widen_llama(tiny[0], 2)


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    """~250 tokens of built-in task prompts and code, the kind of text the model is good at."""
    text = " ".join(e.prompt for e in tasks.get_task("pattern").examples(3, seed=0))
    text += tasks.code_samples(1, seed=0, n_chars=800)[0]
    ids = tiny[1](text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 200
    return ids


def _max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def _greedy(model, tok, prompt: str, n: int = 16) -> list[int]:
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_widened_model_computes_the_same_function(tiny, wide2, prompt_ids):
    model, tok = tiny
    assert _max_logit_diff(model, wide2, prompt_ids) < LOGIT_TOL
    prompt = tasks.get_task("pattern").examples(1, seed=0)[0].prompt
    assert _greedy(wide2, tok, prompt) == _greedy(model, tok, prompt)  # through the KV cache too


def test_widened_shapes_config_and_untied_head(tiny, wide2):
    model, _ = tiny
    cfg = wide2.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (512, 1376, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (8, 4, 6)
    assert cfg.vocab_size == 2048 and cfg.tie_word_embeddings is False
    shapes = {name: tuple(p.shape) for name, p in wide2.named_parameters()}
    layer = "model.layers.0."
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (2048, 512)
    assert shapes[layer + "self_attn.q_proj.weight"] == shapes[layer + "self_attn.o_proj.weight"] == (512, 512)
    assert shapes[layer + "self_attn.k_proj.weight"] == shapes[layer + "self_attn.v_proj.weight"] == (256, 512)
    assert shapes[layer + "mlp.gate_proj.weight"] == shapes[layer + "mlp.up_proj.weight"] == (1376, 512)
    assert shapes[layer + "mlp.down_proj.weight"] == (512, 1376)
    assert shapes[layer + "input_layernorm.weight"] == shapes["model.norm.weight"] == (512,)
    assert wide2.get_output_embeddings().weight.data_ptr() != wide2.get_input_embeddings().weight.data_ptr()
    # the source is untouched: still tied, still narrow
    assert model.config.tie_word_embeddings and model.config.hidden_size == 256
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _small_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      **overrides)
    return LlamaForCausalLM(cfg).eval()


def test_untied_source_and_factor_one():
    small = _small_llama(tie_word_embeddings=False)
    ids = torch.randint(0, 64, (2, 24))
    for factor in (1, 3):
        assert _max_logit_diff(small, widen_llama(small, factor), ids) < LOGIT_TOL


@pytest.mark.parametrize("factor", [0, -2, 1.5, True])
def test_bad_factor_is_refused(tiny, factor):
    with pytest.raises(ValueError, match="factor"):
        widen_llama(tiny[0], factor)


def test_biases_are_refused():
    with pytest.raises(ValueError, match="bias"):
        widen_llama(_small_llama(attention_bias=True), 2)


def test_materialize_wide_writes_a_loadable_checkpoint(tiny, prompt_ids, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = materialize_wide(tmp_path / "wide", factor=2)
    assert out == tmp_path / "wide" and sorted(p.name for p in tmp_path.iterdir()) == ["wide"]  # no temp left
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.hidden_size == 512 and not loaded.config.tie_word_embeddings
    assert _max_logit_diff(tiny[0], loaded, prompt_ids) < LOGIT_TOL
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).get_vocab() == tiny[1].get_vocab()


def test_materialize_wide_is_deterministic(tmp_path):
    a, b = materialize_wide(tmp_path / "a", factor=1), materialize_wide(tmp_path / "b", factor=1)
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_materialize_wide_leaves_nothing_behind_on_failure(tiny, tmp_path, monkeypatch):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    monkeypatch.setattr(widen, "_load_source", lambda: (tiny[0], BrokenTokenizer()))
    with pytest.raises(RuntimeError, match="disk full"):
        materialize_wide(tmp_path / "wide", factor=1)
    assert list(tmp_path.iterdir()) == []


def test_tiny_wide_registry_entry_resolves_into_the_cache(tmp_path, monkeypatch, capsys):
    entry = get_builtin_model("builtin:tiny-wide")
    assert entry.generated_by == "tuner.builtin.widen:materialize_wide"
    assert entry.tasks == get_builtin_model("tiny").tasks
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert entry.checkpoint == tmp_path / "cache" / "builtin" / "tiny-wide"
    monkeypatch.delenv("AUTOTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert entry.checkpoint == tmp_path / "home" / ".cache" / "autotune" / "builtin" / "tiny-wide"
    # listing (registry and CLI) shows it without generating anything
    assert entry in list_builtin_models()
    assert cli_main(["models", "--json"]) == 0
    assert "builtin:tiny-wide" in {row["model"] for row in json.loads(capsys.readouterr().out)}
    assert not (tmp_path / "home").exists()


def test_tiny_wide_is_generated_once_on_first_resolution(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_materialize(out_dir):  # stands in for the real (seconds, ~280 MB) generation
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(widen, "materialize_wide", fake_materialize)
    expected = tmp_path / "builtin" / "tiny-wide"
    assert resolve_model_path("builtin:tiny-wide") == expected
    assert "generating builtin:tiny-wide" in capsys.readouterr().err
    assert builtin_checkpoint("tiny-wide") == expected
    assert calls == [expected]
