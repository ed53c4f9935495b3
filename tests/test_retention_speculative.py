"""Token retention (pruned prefill) composed with tree speculative decoding.

Speculative decoding is lossless relative to the model it verifies with: with token retention applied, its greedy
output must be token for token the greedy output of the pruned target (``model.generate`` under token retention
alone), for every drafter. That needs the pruned layers to honour the verify forward's tree mask and to follow
``compact_cache``'s gathers of their KV caches.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

from policies import apply_policy, model_fingerprint
from policies.drafters import Draft, Drafter
from policies.speculative import SpeculativeStats, speculative_generate
from policies.testing import make_policy_dict
from policies.token_retention import TokenRetentionRuntime
from policies.tree_attention import compact_cache, path_to, tree_attention_mask, tree_position_ids
from profilers.hf_compat import cache_arg
from tuner.models import load_model
from tuner.tasks import get_task

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals

KEEP = {"keep": [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]}
SPECULATIVE = {
    "prompt_lookup": {"drafter": "prompt_lookup", "prompt_lookup": {"depth": 4, "candidates": 2}},
    "layer_skip": {"drafter": "layer_skip", "skip_layers": [3, 4],
                   "tree": {"kind": "static", "parents": [-1, -1, 0, 0, 1, 2]}},
}
N_NEW = 24
PROMPT_TOKENS = 512
# Root (node 0) + two branches: 1 -> 3 and 2 -> 4 (indices among the verify forward's tokens, root included).
VERIFY_PARENTS = [-1, 0, 0, 1, 2]


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


@pytest.fixture(scope="module")
def prompts(tiny):
    """Two needle prompts cut to 512 tokens (long enough for the schedule to drop tokens, short enough to be fast)."""
    examples = get_task("needle").examples(2, seed=1)
    return [tiny.tokenizer(e.prompt, return_tensors="pt").input_ids[:, :PROMPT_TOKENS] for e in examples]


@pytest.fixture(scope="module")
def pruned_greedy(tiny, prompts):
    """Greedy output of the target under token retention alone, per prompt."""
    model = tiny.model
    outputs = []
    for ids in prompts:
        with torch.inference_mode(), apply_policy(model, _policy(model, token_retention=KEEP)) as handle:
            outputs.append(handle.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                                           attention_mask=torch.ones_like(ids), pad_token_id=0))
            tr = dict(handle._handles)["token_retention"]
            assert tr.last_counts[-1] < ids.shape[1]  # the prefill really dropped tokens
    return outputs


def _policy(model, **techniques):
    return make_policy_dict(model_fingerprint(model), techniques=techniques)


@pytest.mark.parametrize("drafter", list(SPECULATIVE))
@pytest.mark.parametrize("which", [0, 1])
def test_speculative_over_pruned_prefill_equals_pruned_greedy(tiny, prompts, pruned_greedy, drafter, which):
    model, ids = tiny.model, prompts[which]
    policy = _policy(model, token_retention=KEEP, speculative=SPECULATIVE[drafter])
    with torch.inference_mode(), apply_policy(model, policy) as handle:
        out = handle.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
        stats = dict(handle._handles)["speculative"].last_stats
    assert torch.equal(out, pruned_greedy[which])
    assert stats.steps < N_NEW  # verification steps ran (and some accepted drafts)


class _SecondBranchOracle(Drafter):
    """A junk chain first (12 random tokens), the pruned target's true continuation second: its rows are right only
    if tree siblings are invisible to each other in every layer (a slot-causal mask in the pruned layers lets the
    second branch see the junk, which changes its logits: fewer accepted tokens, or even a different output)."""

    def __init__(self, reference: list[int], vocab: int, depth: int = 4, n_junk: int = 12) -> None:
        self.reference, self.vocab, self.depth, self.n_junk = reference, vocab, depth, n_junk

    def propose(self, context, sampling, generator):
        true = self.reference[len(context):len(context) + self.depth]
        rng = torch.Generator().manual_seed(len(context))
        junk = torch.randint(0, self.vocab, (self.n_junk,), generator=rng).tolist()
        if true and junk[0] == true[0]:
            junk[0] = (junk[0] + 1) % self.vocab
        k, j = len(true), len(junk)
        parents = list(range(-1, j - 1)) + ([-1] + list(range(j, j + k - 1)) if k else [])
        return Draft(parents, junk + true)


@pytest.mark.parametrize("which", [0, 1])
def test_second_branch_of_a_tree_is_accepted_whole(tiny, prompts, pruned_greedy, which):
    model, ids = tiny.model, prompts[which]
    drafter = _SecondBranchOracle(pruned_greedy[which][0].tolist(), model.config.vocab_size)
    stats = SpeculativeStats()
    with torch.inference_mode(), apply_policy(model, _policy(model, token_retention=KEEP)):
        out = speculative_generate(model, ids, N_NEW, drafter, min_new_tokens=N_NEW, stats=stats)
    assert torch.equal(out, pruned_greedy[which])
    # Every step accepts the whole true branch (4 tokens) plus the bonus token, until the end.
    assert stats.accepted_per_step[:-1] == [4] * (len(stats.accepted_per_step) - 1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tree_rows_equal_each_path_decoded_on_its_own(tiny, prompts, impl):
    """After a pruned prefill, the verify forward's row of every node equals running its path as a chain, and
    the dense layers receive the tree mask itself."""
    model, ids = tiny.model, prompts[0][:, :256]
    tokens = [11, 22, 33, 44, 55]
    seen_masks: dict[int, torch.Tensor] = {}

    def capture(layer):
        def hook(module, args, kwargs):
            seen_masks[layer] = kwargs.get("attention_mask")
        return hook

    def prefill(handle):
        cache = DynamicCache(config=model.config)
        model(ids, **cache_arg(model, cache), use_cache=True)
        assert handle.kv_lengths()[-1] < ids.shape[1]
        return cache

    model.set_attn_implementation(impl)
    try:
        with torch.inference_mode():
            handle = TokenRetentionRuntime().apply(model, KEEP)
            try:
                cache = prefill(handle)
                n_past = cache.get_seq_length()
                mask = tree_attention_mask(VERIFY_PARENTS, n_past)
                hooks = [model.model.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True)
                         for i in (0, 1)]
                try:
                    rows = model(torch.tensor([tokens]), **cache_arg(model, cache), use_cache=True, attention_mask=mask,
                                 position_ids=tree_position_ids(VERIFY_PARENTS, n_past)).logits[0]
                finally:
                    for h in hooks:
                        h.remove()
                for i in (0, 1):  # the non-pruned layers: HF hands them the custom mask as is
                    assert torch.equal(seen_masks[i], mask)
                for node in range(len(tokens)):
                    path = path_to(VERIFY_PARENTS, node)
                    chain = prefill(handle)
                    solo = model(torch.tensor([[tokens[i] for i in path]]), **cache_arg(model, chain),
                                 use_cache=True).logits[0, -1]
                    torch.testing.assert_close(rows[node], solo, atol=2e-4, rtol=1e-4)
            finally:
                handle.remove()
    finally:
        model.set_attn_implementation("sdpa")


def test_compaction_remaps_the_pruned_layers_slots(tiny, prompts):
    model, ids = tiny.model, prompts[0][:, :256]
    with torch.inference_mode():
        handle = TokenRetentionRuntime().apply(model, KEEP)
        state = handle._state
        cache = DynamicCache(config=model.config)
        model(ids, **cache_arg(model, cache), use_cache=True)
        seq = state.seq
        pruned = [i for i, p in enumerate(seq.pruned) if p]
        assert pruned == [2, 3, 4, 5]
        assert len(cache.autotune_compact_listeners) == 1
        context = {i: seq.slots[i].clone() for i in pruned}

        n_past = cache.get_seq_length()
        n_tree = len(VERIFY_PARENTS)
        model(torch.tensor([[11, 22, 33, 44, 55]]), **cache_arg(model, cache), use_cache=True,
              attention_mask=tree_attention_mask(VERIFY_PARENTS, n_past),
              position_ids=tree_position_ids(VERIFY_PARENTS, n_past))
        keep = [0, 2, 4]  # root, then the second branch
        compact_cache(cache, n_past, keep)
        assert cache.get_seq_length() == n_past + len(keep)
        for i in pruned:
            slots = seq.slots[i]
            assert slots.numel() == cache.layers[i].keys.shape[-2] == context[i].numel() + len(keep)
            assert torch.equal(slots[:context[i].numel()], context[i])
            assert torch.equal(slots[-len(keep):], n_past + torch.arange(len(keep)))

        # A decode step after the compaction sees consistent lengths; the next tree compacts the same way.
        model(torch.tensor([[66]]), **cache_arg(model, cache), use_cache=True)
        n_past = cache.get_seq_length()
        model(torch.tensor([[11, 22, 33, 44, 55]]), **cache_arg(model, cache), use_cache=True,
              attention_mask=tree_attention_mask(VERIFY_PARENTS, n_past),
              position_ids=tree_position_ids(VERIFY_PARENTS, n_past))
        compact_cache(cache, n_past, [0, 1])
        for i in pruned:
            assert seq.slots[i].numel() == cache.layers[i].keys.shape[-2]
            assert torch.equal(seq.slots[i][-3:], torch.tensor([n_past - 1, n_past, n_past + 1]))

        # Once the handle is removed the listener does nothing, and the cache does not keep the state alive.
        before = {i: seq.slots[i].clone() for i in pruned}
        handle.remove()
        n_past = cache.get_seq_length()
        for layer in cache.layers:  # stand-in for a tree forward: n_tree more entries in every layer
            layer.keys = torch.cat([layer.keys, layer.keys[..., -n_tree:, :]], dim=-2)
            layer.values = torch.cat([layer.values, layer.values[..., -n_tree:, :]], dim=-2)
        compact_cache(cache, n_past, [0])
        assert all(torch.equal(seq.slots[i], before[i]) for i in pruned)
        state_ref = weakref.ref(state)
        del handle, state
        gc.collect()
        assert state_ref() is None
        assert len(cache.autotune_compact_listeners) == 1  # still there, inert


def test_recycle_drafter_composes_with_token_retention(tiny, prompts):
    """Token retention returns logits for the kept prompt rows only; the recycling drafter still works."""
    retention = {"keep": [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]}
    recycle = {"drafter": "recycle", "recycle": {"k": 4}, "tree": {"kind": "static", "parents": [-1, -1, 0, 1]},
               "prompt_lookup": {"depth": 3}}
    ids = prompts[0]
    with torch.inference_mode():
        with apply_policy(tiny.model, _policy(tiny.model, token_retention=retention)) as handle:
            reference = handle.generate(ids, max_new_tokens=16, min_new_tokens=16)
        with apply_policy(tiny.model, _policy(tiny.model, token_retention=retention, speculative=recycle)) as handle:
            assert torch.equal(handle.generate(ids, max_new_tokens=16, min_new_tokens=16), reference)
