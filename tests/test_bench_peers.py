"""Peers in `autotune bench`: Hugging Face's speculative decoders are greedy-lossless, and a technique's
peers are timed and scored beside the policy as `peer:<name>` rows (with the `decode_speedup` column).

The real `speculative` search space is not wired here: a test-only technique (no-op runtime + a search
space whose `peers` returns `hf_speculative_peers`) stands in for it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import search_spaces
from policies import model_fingerprint, policy_from_dict
from policies.registry import FunctionHandle, TechniqueRuntime, register_runtime, unregister_runtime
from policies.testing import make_policy_dict, tiny_llama
from search_spaces import Peer, SearchContext, SearchSpace
from search_spaces.speculative_peers import hf_speculative_peers
from tuner.bench import Variant, run_bench
from tuner.models import load_model
from tuner.quality import QualityConfig
from tuner.tasks import get_task
from tuner.workload import Workload

NAME = "speculative_test_peers"
NEW = 12


class _NoopRuntime(TechniqueRuntime):
    name = NAME

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return []

    def apply(self, model: Any, section: dict[str, Any]) -> FunctionHandle:
        return FunctionHandle(lambda: None)


class _PeersSpace(SearchSpace):
    name = NAME

    def suggest(self, trial: Any, ctx: SearchContext) -> dict[str, Any]:
        return {}

    def peers(self, model: Any, section: dict[str, Any], ctx: SearchContext) -> list[Peer]:
        return hf_speculative_peers(model, section)


@pytest.fixture
def technique(monkeypatch):
    monkeypatch.setitem(search_spaces._SPACES._items, NAME, _PeersSpace())  # restored after the test
    register_runtime(_NoopRuntime(), replace=True)
    yield NAME
    unregister_runtime(NAME)


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tiny):
    """A random-init 1-layer Llama with builtin:tiny's vocabulary, saved as a local checkpoint (the builtin
    draft may not be trained in this checkout)."""
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=tiny.model.config.vocab_size)
    path = tmp_path_factory.mktemp("draft")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


def _dense(model: Any, ids: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones_like(ids), pad_token_id=pad)


def test_peer_is_a_frozen_record_and_the_default_space_has_none():
    peer = Peer("x", lambda ids, **kw: ids, "src")
    with pytest.raises(AttributeError):
        peer.name = "y"  # type: ignore[misc]
    assert SearchSpace().peers(None, {}, None) == []  # the default: no peers


def test_hf_peers_equal_dense_greedy_on_builtin_tiny(tiny, draft_dir):
    model, tok = tiny.model, tiny.tokenizer
    peers = {p.name: p for p in hf_speculative_peers(model, {"draft_model": str(draft_dir)})}
    assert list(peers) == ["hf-assisted", "hf-prompt-lookup"]
    assert "prompt_lookup_num_tokens=10" in peers["hf-prompt-lookup"].source
    assert "num_assistant_tokens=" in peers["hf-assisted"].source and str(draft_dir) in peers["hf-assisted"].source
    pad = tok.pad_token_id or tok.eos_token_id
    prompts = [e.prompt for e in get_task("pattern").examples(2, seed=0)]  # repetitive: lookups hit
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            ref = _dense(model, ids, NEW, pad)
            for peer in peers.values():
                assert torch.equal(peer.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW), ref), peer.name
            # the quality harness calls generate with max_new_tokens only
            short = peers["hf-prompt-lookup"].generate(ids, max_new_tokens=4)
            assert torch.equal(short, model.generate(ids, max_new_tokens=4, do_sample=False,
                                                     attention_mask=torch.ones_like(ids), pad_token_id=pad))


@pytest.mark.parametrize("draft_kind", ["smaller", "same"])
def test_hf_assisted_equals_dense_greedy_random_llama(draft_kind):
    target = tiny_llama(seed=0, layers=2)
    if draft_kind == "same":  # every draft token accepted: the long-acceptance path
        draft = target
    else:  # a different random model: almost every draft token rejected
        torch.manual_seed(1)
        draft = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              num_key_value_heads=1, intermediate_size=64, vocab_size=256)).eval()
    assisted = hf_speculative_peers(target, {}, draft_model=draft)[0]
    assert assisted.name == "hf-assisted"
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):
            ids = torch.randint(0, 256, (1, 16), generator=gen)
            ref = _dense(target, ids, 24, 0)
            assert torch.equal(assisted.generate(ids, max_new_tokens=24, min_new_tokens=24, pad_token_id=0), ref)


def test_draft_resolution(tiny):
    peers = hf_speculative_peers(tiny.model, {"drafter": "prompt_lookup"})  # no draft named: no assisted peer
    assert [p.name for p in peers] == ["hf-prompt-lookup"]
    with pytest.raises(ValueError, match="no-such"):  # a draft the policy names must exist
        hf_speculative_peers(tiny.model, {"draft_model": "builtin:no-such"})
    with pytest.raises(ValueError, match="vocabulary"):  # builtin:tiny (2048) cannot draft for a 256-vocab target
        hf_speculative_peers(tiny_llama(), {"draft_model": "builtin:tiny"})


def test_variant_is_a_policy_or_a_generate_callable(tiny):
    policy = policy_from_dict(make_policy_dict(model_fingerprint(tiny.model)))
    with pytest.raises(ValueError, match="not both"):
        Variant("x", policy, generate=lambda ids, **kw: ids)


def test_bench_lists_peers_with_quality_and_decode_speedup(technique, tiny, draft_dir):
    doc = make_policy_dict(model_fingerprint(tiny.model), techniques={technique: {"draft_model": str(draft_dir)}})
    doc["objective"]["quality_metric"] = "accuracy"
    policy = policy_from_dict(doc)
    quality = QualityConfig(tasks=("pattern",), examples_per_task=1, free_text_samples=1, free_text_chars=300)
    bench = run_bench("builtin:tiny", policy, "cpu", Workload(prompt_tokens=48, new_tokens=6), repeats=2,
                      quality=quality, with_presets=False)
    rows = {r["name"]: r for r in bench["results"]}
    assert list(rows) == ["dense", "policy", "peer:hf-assisted", "peer:hf-prompt-lookup"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["latency_ms"] > 0
        assert row["decode_speedup"] == pytest.approx(row["tokens_per_s"] / rows["dense"]["tokens_per_s"])
        assert row["quality_metric"] == "accuracy"
    assert rows["dense"]["decode_speedup"] == 1.0
    for name in ("peer:hf-assisted", "peer:hf-prompt-lookup"):
        assert rows[name]["quality"] == rows["dense"]["quality"]  # greedy-lossless: same answers as dense
        assert rows[name]["source"].startswith("transformers ")
        assert rows[name]["kv_cache_mb"] == rows["dense"]["kv_cache_mb"]  # run on the dense model
    assert bench["repeats"] == 2

