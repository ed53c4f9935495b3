"""Tree verification in one forward equals running every root-to-node path on its own."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from policies.tree_attention import (
    accept_greedy,
    ancestor_matrix,
    compact_cache,
    node_depths,
    path_to,
    tree_attention_mask,
    tree_position_ids,
    validate_parents,
)
from profilers.hf_compat import cache_arg

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals

# A small tree: two root children, one with a chain below it, one with two children.
PARENTS = [-1, -1, 0, 2, 1, 1, 4]

CONFIGS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def _model(name: str):
    config_cls, model_cls = CONFIGS[name]
    torch.manual_seed(0)
    cfg = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=128, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return model_cls(cfg).eval()


def test_depths_ancestors_and_paths():
    assert node_depths(PARENTS) == [0, 0, 1, 2, 1, 1, 2]
    visible = ancestor_matrix(PARENTS)
    assert visible[3].nonzero().flatten().tolist() == [0, 2, 3]
    assert visible[6].nonzero().flatten().tolist() == [1, 4, 6]
    assert path_to(PARENTS, 6) == [1, 4, 6]
    assert tree_position_ids(PARENTS, 10).tolist() == [[10, 10, 11, 12, 11, 11, 12]]


def test_a_parent_after_its_child_is_rejected_with_the_index_named():
    assert validate_parents([-1, 2, 0]) == ["parents[1]: parent 2 must be -1 (the root) or an earlier node (< 1)"]
    with pytest.raises(ValueError, match=r"parents\[2\]"):
        node_depths([-1, 0, 5])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_tree_forward_matches_each_path_run_alone(name):
    model = _model(name)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 128, (1, 12), generator=gen)
    tree_tokens = torch.randint(0, 128, (1, len(PARENTS)), generator=gen)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(prefix, **cache_arg(model, cache), use_cache=True)
        n_past = prefix.shape[1]
        out = model(tree_tokens, **cache_arg(model, cache), use_cache=True,
                    attention_mask=tree_attention_mask(PARENTS, n_past),
                    position_ids=tree_position_ids(PARENTS, n_past))
        tree_logits = out.logits[0]
        worst = 0.0
        for node in range(len(PARENTS)):
            path = tree_tokens[0, path_to(PARENTS, node)]
            alone = model(torch.cat([prefix[0], path])[None]).logits[0, -1]
            worst = max(worst, (alone - tree_logits[node]).abs().max().item())
    assert worst < 1e-4, worst


def test_greedy_acceptance_picks_the_matching_path_and_the_bonus():
    vocab = 10
    tokens = torch.tensor([3, 4, 5, 6, 7, 8, 9])  # node i carries token tokens[i]
    root = torch.zeros(vocab)
    root[4] = 1  # the target wants 4 first: node 1
    logits = torch.zeros(len(PARENTS), vocab)
    logits[1, 8] = 1  # after node 1 it wants 8: node 5 (node 4 carries 7)
    logits[5, 2] = 1  # after node 5 it wants 2: no child -> bonus 2
    assert accept_greedy(PARENTS, tokens, root, logits) == ([1, 5], 2)
    root[4], root[0] = 0, 1  # a first token no root child has
    assert accept_greedy(PARENTS, tokens, root, logits) == ([], 0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compacted_cache_equals_decoding_the_accepted_path(name):
    model = _model(name)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 128, (1, 10), generator=gen)
    tree_tokens = torch.randint(0, 128, (1, len(PARENTS)), generator=gen)
    accepted = path_to(PARENTS, 6)  # nodes 1, 4, 6: not contiguous in tree order
    nxt = torch.randint(0, 128, (1, 1), generator=gen)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(prefix, **cache_arg(model, cache), use_cache=True)
        model(tree_tokens, **cache_arg(model, cache), use_cache=True,
              attention_mask=tree_attention_mask(PARENTS, prefix.shape[1]),
              position_ids=tree_position_ids(PARENTS, prefix.shape[1]))
        compact_cache(cache, prefix.shape[1], accepted)
        chain = DynamicCache(config=model.config)
        model(torch.cat([prefix, tree_tokens[:, accepted]], dim=1), **cache_arg(model, chain), use_cache=True)
        for ours, ref in zip(cache.layers, chain.layers, strict=True):
            assert ours.keys.shape == ref.keys.shape
            assert torch.allclose(ours.keys, ref.keys, atol=1e-5) and torch.allclose(ours.values, ref.values, atol=1e-5)
        ours, want = model(nxt, **cache_arg(model, cache)).logits, model(nxt, **cache_arg(model, chain)).logits
        assert torch.allclose(ours, want, atol=1e-4)

