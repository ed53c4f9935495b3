"""Tree verification in one forward equals running every root-to-node path on its own."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from policies.tree_attention import (
    ancestor_matrix,
    node_depths,
    path_to,
    tree_attention_mask,
    tree_position_ids,
    validate_parents,
)

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
        model(prefix, past_key_values=cache, use_cache=True)
        n_past = prefix.shape[1]
        out = model(tree_tokens, past_key_values=cache, use_cache=True,
                    attention_mask=tree_attention_mask(PARENTS, n_past),
                    position_ids=tree_position_ids(PARENTS, n_past))
        tree_logits = out.logits[0]
        worst = 0.0
        for node in range(len(PARENTS)):
            path = tree_tokens[0, path_to(PARENTS, node)]
            alone = model(torch.cat([prefix[0], path])[None]).logits[0, -1]
            worst = max(worst, (alone - tree_logits[node]).abs().max().item())
    assert worst < 1e-4, worst
