"""Tree speculative decoding is lossless: token for token the target's greedy output, for every drafter."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from policies.drafters import (
    Draft,
    Drafter,
    LayerSkipLM,
    MergedDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    RecycleDrafter,
    merge_drafts,
    trie,
)
from policies.speculative import SpeculativeStats, chain, speculative_generate
from profilers.hf_compat import cache_arg
from tuner.models import load_model

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals

PROMPTS = ["copy: owl fox bear heron whale |", "cycle: red gold red gold red gold |",
           "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"]
SHAPE = [-1, -1, 0, 0, 1, 2, 5]  # two root children, a branch and a chain below the first


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def _dense(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)


def _random_lm(kind: str, layers: int = 4, hidden: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    draft = PromptLookupDrafter(depth=3, max_ngram=2)
    assert draft.propose([5, 6, 7, 8, 9, 5, 6]) == chain([7, 8, 9])
    assert draft.propose([1, 2, 3]) == Draft([], [])


def test_prompt_lookup_merges_distinct_continuations_into_a_trie():
    draft = PromptLookupDrafter(depth=2, max_ngram=1, candidates=3)
    # "5" was followed by 6 7, by 6 8 and by 9 (most recent first: 9, then 6 8, then 6 7)
    proposal = draft.propose([5, 6, 7, 0, 5, 6, 8, 0, 5, 9, 0, 5])
    assert proposal == trie([[9, 0], [6, 8], [6, 7]])
    assert proposal.parents == [-1, 0, -1, 2, 2] and proposal.tokens == [9, 0, 6, 8, 7]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_lookup_output_equals_dense_greedy(tiny, prompt):
    ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    stats = SpeculativeStats()
    spec = speculative_generate(tiny.model, ids, 24, PromptLookupDrafter(depth=4, candidates=2),
                                min_new_tokens=24, eos_token_id=tiny.tokenizer.eos_token_id, stats=stats)
    assert torch.equal(spec, _dense(tiny.model, ids, 24))
    assert stats.steps + stats.accepted >= 23  # every step yields its accepted tokens plus one


class _JunkDrafter(Drafter):
    """Proposes junk branches plus the last context token: verification must reject what is wrong."""

    def propose(self, context, sampling, generator):
        return Draft([-1, -1, 0, 1], [7, 8, 9, context[-1]])


def test_a_wrong_tree_still_gives_dense_output(tiny):
    ids = tiny.tokenizer("copy: 1 2 3 4 |", return_tensors="pt").input_ids
    spec = speculative_generate(tiny.model, ids, 12, _JunkDrafter(), min_new_tokens=12)
    assert torch.equal(spec, _dense(tiny.model, ids, 12))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("drafter_kind", ["draft_model_static", "draft_model_dynamic", "layer_skip", "lookup",
                                          "recycle"])
def test_every_drafter_is_lossless_on_random_models(kind, drafter_kind):
    target = _random_lm(kind)
    if drafter_kind == "draft_model_static":
        drafter = ModelDrafter(_random_lm(kind, layers=1, hidden=32, seed=1), SHAPE)
    elif drafter_kind == "draft_model_dynamic":
        drafter = ModelDrafter(_random_lm(kind, layers=1, hidden=32, seed=1), None, dynamic_depth=3,
                               dynamic_topk=2, dynamic_tokens=5)
    elif drafter_kind == "layer_skip":
        drafter = ModelDrafter(LayerSkipLM(target, [1, 2]), SHAPE)
    elif drafter_kind == "recycle":
        drafter = RecycleDrafter(SHAPE, k=4)
    else:
        drafter = PromptLookupDrafter(depth=3, candidates=2)
    torch.manual_seed(5)
    ids = torch.randint(0, 96, (1, 20))
    ids = torch.cat([ids, ids[:, :10]], dim=1)  # a repeat, so that lookup has something to find
    stats = SpeculativeStats()
    spec = speculative_generate(target, ids, 30, drafter, min_new_tokens=30, stats=stats)
    assert torch.equal(spec, _dense(target, ids, 30))
    assert stats.steps < 30 or drafter_kind in ("lookup", "recycle")


def test_layer_skip_drafter_is_the_target_without_those_layers_and_restores_it():
    target = _random_lm("llama")
    lm = LayerSkipLM(target, [2, 3])
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        full = target(ids).logits
        skipped = lm(ids).logits
        assert len(target.model.layers) == 4  # restored after the call
        assert torch.equal(target(ids).logits, full)
        # The same as a two-layer model holding layers 0 and 1.
        target.model.layers = target.model.layers[:2]
        assert torch.allclose(skipped, target(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="layer 0 is always run"):
        LayerSkipLM(target, [0, 1])


def test_draft_cache_holds_exactly_the_committed_tokens(tiny):
    """After each step the draft model's cache equals the draft run over the committed context."""
    drafter = ModelDrafter(LayerSkipLM(tiny.model, [3, 4]), SHAPE)
    ids = tiny.tokenizer(PROMPTS[1], return_tensors="pt").input_ids

    class Spy(Drafter):
        def begin(self, input_ids):
            drafter.begin(input_ids)

        def propose(self, context, sampling, generator):
            if drafter.kv is not None and drafter.n_cached:
                from transformers import DynamicCache

                ref = DynamicCache(config=tiny.model.config)
                drafter.lm(torch.tensor([context[:drafter.n_cached]]), **cache_arg(drafter.lm, ref), use_cache=True)
                for ours, want in zip(drafter.kv.layers, ref.layers, strict=True):
                    if want.is_initialized:
                        assert torch.allclose(ours.keys, want.keys, atol=1e-4)
            return drafter.propose(context, sampling, generator)

        def commit(self, accepted):
            drafter.commit(accepted)

    spec = speculative_generate(tiny.model, ids, 16, Spy(), min_new_tokens=16)
    assert torch.equal(spec, _dense(tiny.model, ids, 16))


def test_eos_stops_generation_like_dense(tiny):
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    eos = int(_dense(tiny.model, ids, 6)[0, -3])  # pretend the 4th generated token is EOS
    spec = speculative_generate(tiny.model, ids, 20, PromptLookupDrafter(), eos_token_id=eos)
    with torch.inference_mode():
        dense = tiny.model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                    attention_mask=torch.ones_like(ids))
    assert torch.equal(spec, dense)


def test_recycle_drafter_fills_the_shape_from_the_targets_recycled_top_k():
    drafter = RecycleDrafter([-1, -1, 0], k=2)
    vocab = 10
    logits = torch.zeros(3, vocab)
    logits[0, [4, 5]] = torch.tensor([2.0, 1.0])  # after token 1: 4 then 5
    logits[1, [6, 7]] = torch.tensor([2.0, 1.0])  # after token 2: 6 then 7
    logits[2, [8, 9]] = torch.tensor([2.0, 1.0])  # after token 4: 8 then 9
    drafter.observe(torch.tensor([1, 2, 4]), logits)
    assert drafter.propose([0, 1]) == Draft([-1, -1, 0], [4, 5, 8])
    drafter.begin(torch.tensor([[0]]))
    assert drafter.propose([0, 1]) == Draft([], [])  # a new sequence starts from an empty table
    assert drafter.propose([0, 3]) == Draft([], [])  # nothing recycled for token 3 yet
    with pytest.raises(ValueError, match="more than the 1 recycled"):
        RecycleDrafter([-1, -1], k=1)


@pytest.mark.parametrize("prompt", PROMPTS[1:])
def test_recycle_output_equals_dense_greedy_on_tiny(tiny, prompt):
    ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    drafter = RecycleDrafter(SHAPE, k=4)
    for _ in range(2):  # the table starts empty for each sequence: both calls draft the same way
        spec = speculative_generate(tiny.model, ids, 24, drafter, min_new_tokens=24)
        assert torch.equal(spec, _dense(tiny.model, ids, 24))


def test_merged_draft_keeps_base_indices_and_shares_prefixes():
    base = Draft([-1, 0], [5, 6])
    extra = chain([5, 7, 8])
    merged = merge_drafts(base, extra)
    assert merged == Draft([-1, 0, 0, 2], [5, 6, 7, 8])


def test_recycle_plus_lookup_is_lossless_on_tiny(tiny):
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    drafter = MergedDrafter(RecycleDrafter(SHAPE, k=4), PromptLookupDrafter(depth=4))
    spec = speculative_generate(tiny.model, ids, 24, drafter, min_new_tokens=24)
    assert torch.equal(spec, _dense(tiny.model, ids, 24))


def test_builtin_draft_model_is_lossless_on_tiny(tiny):
    from policies.speculative import load_draft_model

    draft = load_draft_model("builtin:tiny-draft", torch.device("cpu"))
    ids = tiny.tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    for drafter in (ModelDrafter(draft, SHAPE), ModelDrafter(draft, None, dynamic_depth=5, dynamic_topk=4,
                                                             dynamic_tokens=8)):
        stats = SpeculativeStats()
        spec = speculative_generate(tiny.model, ids, 24, drafter, min_new_tokens=24, stats=stats)
        assert torch.equal(spec, _dense(tiny.model, ids, 24))
        assert stats.accepted > 0  # the distilled draft agrees with its target some of the time
