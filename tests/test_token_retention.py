"""Token-retention runtime: exact when it keeps everything, correct when it drops.

Correctness of a pruned prefill + decode is checked against an independent reference that never drops a row:
it runs every decoder layer on the whole sequence with an explicit mask that hides, from each layer, the
prompt tokens that layer did not keep (``_reference_logits``). Kept rows then see exactly what the runtime's
pruned rows see, so their logits must agree; dropped rows are garbage nobody reads. That comparison runs in
float64 with atol 1e-9 (observed: <= 2e-15), so any slip in positions, masks or caches shows; in float32 the
same comparison differs by up to ~2e-5 on logits of magnitude ~6 from summation order alone (one float32 case
at atol 1e-4), and HF's eager attention takes its softmax in float32 even for float64 models (atol 1e-5).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from policies import PolicyError, apply_policy, model_fingerprint, validate_policy_dict
from policies.registry import get_runtime
from policies.testing import make_policy_dict
from policies.token_retention import (
    TokenRetentionConfig,
    TokenRetentionRuntime,
    droppable_mask,
    kept_counts,
    kept_counts_for_section,
    kv_cache_bytes,
    pool_scores,
    select_kept,
)
from profilers.hf_compat import cache_arg, output_cache
from profilers.model_parts import decoder_parts

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals

VOCAB = 160

_FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}),
}
FAMILIES = sorted(_FAMILIES)


def tiny(family: str, layers: int = 4, seed: int = 0, attn: str = "sdpa", **overrides: Any) -> Any:
    """A random-init decoder of ``family`` (hidden 64, GQA 4/2 heads); a larger init than HF's default so
    that attention is far from uniform and dropping tokens visibly changes the logits."""
    config_cls, model_cls, extra = _FAMILIES[family]
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.2)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).eval()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def apply(model: Any, **section: Any) -> Any:
    return get_runtime("token_retention").apply(model, section)


def _no_hooks(model: Any) -> bool:
    parts = decoder_parts(model)
    modules = [parts.base, *parts.layers]
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)


def _reference_logits(model: Any, ids: torch.Tensor, kept: list[torch.Tensor], n_prompt: int,
                      sliding_window: int | None = None, capture: dict[int, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """Logits of every row of ``ids`` when layer ``l`` may only attend to the prompt tokens ``kept[l]`` (and to
    every token after the prompt), with the model's own (dense) attention implementation and rotary.

    ``capture``: fill with each layer's attention weights (eager implementation only)."""
    parts = decoder_parts(model)
    eager = model.config._attn_implementation == "eager"
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    hooks = []
    if capture is not None:
        for i, layer in enumerate(parts.layers):
            hooks.append(layer.self_attn.register_forward_hook(
                lambda _m, _a, out, i=i: capture.__setitem__(i, out[1])))
    try:
        with torch.no_grad():
            h = parts.embed(ids)
            cos_sin = parts.rotary(h, pos)
            for i, layer in enumerate(parts.layers):
                visible = torch.zeros(n, dtype=torch.bool)
                visible[kept[i]] = True
                visible[n_prompt:] = True
                allowed = (k <= q) & visible[None, :]
                if sliding_window is not None:
                    allowed &= (q - k) < sliding_window
                allowed |= torch.eye(n, dtype=torch.bool)  # dropped rows: finite garbage, never attended to
                mask = allowed[None, None]
                if eager:
                    mask = torch.zeros(mask.shape, dtype=h.dtype).masked_fill(~mask, torch.finfo(h.dtype).min)
                h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
            return parts.lm_head(parts.norm(h))[0]
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------------------------
# Section validation and pure helpers
# ------------------------------------------------------------------------------------------------------------

P = "techniques.token_retention"


def test_valid_sections_pass() -> None:
    assert TokenRetentionConfig.section_problems({"keep": [1.0, 1.0, 0.5, 0.25]}, P) == []
    full = {"keep": [1, 0.8, 0.8, 0.1], "scorer": "l2norm", "window": 1, "sinks": 0, "scope": [5, 90],
            "min_prompt_tokens": 0}
    assert TokenRetentionConfig.section_problems(full, P) == []
    assert TokenRetentionRuntime().json_schema()["required"] == ["keep"]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"keep": [1.0, 1.0, 0.5, 1.5]}, f"{P}.keep[3]: must be a number in (0, 1]"),
        ({"keep": [1.0, 1.0, 0.5, 0.0]}, f"{P}.keep[3]: must be a number in (0, 1]"),
        ({"keep": [1.0, 1.0, 0.5, True]}, f"{P}.keep[3]: must be a number in (0, 1]"),
        (
            {"keep": [1.0, 0.9, 0.7, 0.5, 0.6]},
            f"{P}.keep: must be non-increasing with depth (keep[4]=0.6 > keep[3]=0.5)",
        ),
        ({"keep": [0.9, 0.9]}, f"{P}.keep[0]: must be 1.0"),
        ({"keep": []}, f"{P}.keep: must be a non-empty list"),
        ({"keep": "1,1"}, f"{P}.keep: must be a non-empty list"),
        ({}, f"{P}.keep: required"),
        ({"keep": [1.0], "scorer": "random"}, f"{P}.scorer: must be one of attention, l2norm"),
        ({"keep": [1.0], "window": 0}, f"{P}.window: must be an integer >= 1"),
        ({"keep": [1.0], "window": 2.5}, f"{P}.window: must be an integer >= 1"),
        ({"keep": [1.0], "sinks": -1}, f"{P}.sinks: must be an integer >= 0"),
        ({"keep": [1.0], "scope": [10, 5]}, f"{P}.scope: must be [start, end)"),
        ({"keep": [1.0], "scope": [0, 5, 9]}, f"{P}.scope: must be [start, end)"),
        ({"keep": [1.0], "scope": [-1, 5]}, f"{P}.scope: must be [start, end)"),
        ({"keep": [1.0], "min_prompt_tokens": "64"}, f"{P}.min_prompt_tokens: must be an integer >= 0"),
        ({"keep": [1.0], "ratio": 0.5}, f"{P}.ratio: unknown field"),
    ],
)
def test_invalid_sections_name_the_field(section: dict[str, Any], expected: str) -> None:
    problems = TokenRetentionConfig.section_problems(section, P)
    assert any(p.startswith(expected) for p in problems), problems


def test_policy_files_are_validated_by_the_runtime() -> None:
    bad = make_policy_dict(techniques={"token_retention": {"keep": [1.0, 0.5, 0.7]}})
    problems = validate_policy_dict(bad)
    assert any(p.startswith(f"{P}.keep: must be non-increasing") for p in problems), problems


def test_layer_count_is_checked_at_apply() -> None:
    model = tiny("llama", layers=6)
    with pytest.raises(PolicyError, match=r"techniques\.token_retention\.keep: has 5 entries, the model has 6 layers"):
        apply(model, keep=[1.0] * 5)
    assert model.config._attn_implementation == "sdpa" and _no_hooks(model)


def test_kept_counts_arithmetic() -> None:
    keep = [1.0, 1.0, 0.5, 0.25]
    assert kept_counts(keep, 100, sinks=4, window=8) == [100, 100, 50, 25]
    # the protected tokens (4 sinks + 8 window) are a floor
    assert kept_counts([1.0, 0.05], 100, sinks=4, window=8) == [100, 12]
    # scope: only [20, 60) may shrink (40 tokens, 2 of them in the window? no: window is 92..99)
    assert kept_counts(keep, 100, sinks=4, window=8, scope=[20, 60]) == [100, 100, 80, 70]
    # the scope is clipped to the prompt; protected tokens inside it count
    assert kept_counts([1.0, 0.0001], 50, sinks=4, window=8, scope=[0, 500]) == [50, 12]
    # short prompts run dense
    assert kept_counts(keep, 40, min_prompt_tokens=64) == [40] * 4
    assert kept_counts_for_section({"keep": keep}, 40) == [40] * 4
    assert kept_counts_for_section({"keep": keep}, 100) == [100, 100, 50, 25]
    # halves round up (0.15 * 50 = 7.5 despite binary noise)
    assert kept_counts([1.0, 0.15], 50, sinks=0, window=1) == [50, 8]
    assert kv_cache_bytes([100, 50], num_key_value_heads=2, head_dim=16, bytes_per_element=4, new_tokens=10) == (
        (110 + 60) * 2 * 2 * 16 * 4
    )


def test_select_kept_protects_sinks_and_window_against_adversarial_scores() -> None:
    n, sinks, window = 40, 4, 6
    slots = torch.arange(n)
    droppable = droppable_mask(slots, n, sinks, window, None)
    scores = torch.arange(n, dtype=torch.float32)
    scores[:sinks] = -1e9  # the protected tokens look worst
    scores[-window:] = float("nan")
    kept = select_kept(scores, droppable, 15)
    assert kept.tolist() == [0, 1, 2, 3, 29, 30, 31, 32, 33, *range(34, 40)]
    # scope: tokens outside [10, 20) are never candidates
    droppable = droppable_mask(slots, n, sinks, window, [10, 20])
    assert droppable.nonzero().squeeze(1).tolist() == list(range(10, 20))


# ------------------------------------------------------------------------------------------------------------
# Exactness when nothing is dropped, and remove()
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_is_bit_identical(family: str) -> None:
    model = tiny(family)
    ids = prompt(72)
    with torch.no_grad():
        dense = model(ids).logits
        dense_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
        handle = apply(model, keep=[1.0] * 4, min_prompt_tokens=8)
        try:
            assert model.config._attn_implementation == "autotune_tr_sdpa"
            assert torch.equal(model(ids).logits, dense)
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), dense_gen)
        finally:
            handle.remove()
        assert model.config._attn_implementation == "sdpa" and _no_hooks(model)
        assert torch.equal(model(ids).logits, dense)


def test_short_prompts_run_dense_and_batches_need_dense_prompts() -> None:
    model = tiny("llama")
    with torch.no_grad():
        short = prompt(40)
        dense = model(short).logits
        batch = torch.cat([prompt(40, 1), prompt(40, 2)])
        dense_batch = model(batch).logits
        handle = apply(model, keep=[1.0, 0.5, 0.5, 0.5])  # min_prompt_tokens defaults to 64
        try:
            assert torch.equal(model(short).logits, dense)
            assert torch.equal(model(batch).logits, dense_batch)
            long_batch = torch.cat([prompt(80, 1), prompt(80, 2)])
            with pytest.raises(ValueError, match="batch size 1"):
                model(long_batch)
        finally:
            handle.remove()


def test_refuses_second_application_and_flash_attention() -> None:
    model = tiny("llama")
    handle = apply(model, keep=[1.0] * 4)
    try:
        with pytest.raises(ValueError, match="already applied"):
            apply(model, keep=[1.0] * 4)
    finally:
        handle.remove()
    other = tiny("llama")
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        apply(other, keep=[1.0] * 4)


# ------------------------------------------------------------------------------------------------------------
# The schedule: what is kept, and the caches
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", ["attention", "l2norm"])
def test_schedule_kv_lengths_sinks_and_window(scorer: str) -> None:
    model = tiny("phi3", layers=6)
    n = 120
    keep = [1.0, 1.0, 0.6, 0.6, 0.3, 0.2]
    handle = apply(model, keep=keep, scorer=scorer, window=8, sinks=4, min_prompt_tokens=16)
    try:
        with torch.no_grad():
            out = model(prompt(n), use_cache=True)
        counts = kept_counts(keep, n, sinks=4, window=8)
        assert counts == [120, 120, 72, 72, 36, 24]
        assert handle.last_counts == counts
        assert handle.kv_lengths() == counts
        assert [output_cache(out).get_seq_length(i) for i in range(6)] == counts
        assert out.logits.shape[1] == counts[-1]
        previous = set(range(n))
        for layer, kept in enumerate(handle.last_kept_indices):
            ids = kept.tolist()
            assert ids == sorted(ids) and len(ids) == counts[layer]
            assert set(ids) <= previous  # nested: a dropped token never comes back
            assert set(range(4)) | set(range(n - 8, n)) <= set(ids)
            previous = set(ids)
        assert sorted(handle.last_scores) == [1, 3, 4]  # the layers just before each drop
    finally:
        handle.remove()


def test_adversarial_scores_keep_sinks_window_and_follow_the_scores() -> None:
    model = tiny("llama")
    n = 90
    handle = apply(model, keep=[1.0, 0.5, 0.3, 0.3], scorer="l2norm", window=6, sinks=3, min_prompt_tokens=8)

    def adversarial(layer: int, hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        scores = slots.float()  # later tokens look better ...
        scores[slots < 3] = -1e6  # ... the sinks and the window look worst
        scores[slots >= n - 6] = -1e6
        return scores

    handle.score_override = adversarial
    try:
        with torch.no_grad():
            model(prompt(n))
        kept = handle.last_kept_indices
        counts = kept_counts([1.0, 0.5, 0.3, 0.3], n, sinks=3, window=6)
        for layer in (1, 2, 3):
            free = counts[layer] - 9
            expected = [0, 1, 2, *range(n - 6 - free, n - 6), *range(n - 6, n)]
            assert kept[layer].tolist() == expected
    finally:
        handle.remove()


def test_scope_tokens_outside_are_never_dropped() -> None:
    model = tiny("qwen2")
    n, scope = 100, [20, 70]
    keep = [1.0, 0.4, 0.4, 0.1]
    handle = apply(model, keep=keep, scope=scope, sinks=4, window=8, min_prompt_tokens=8)
    try:
        with torch.no_grad():
            model(prompt(n))
        outside = set(range(0, 20)) | set(range(70, n))
        for layer, kept in enumerate(handle.last_kept_indices):
            ids = set(kept.tolist())
            assert outside <= ids
            assert len(ids) == kept_counts(keep, n, sinks=4, window=8, scope=scope)[layer]
        assert len(handle.last_kept_indices[-1]) == 50 + 5  # 10% of the 50-token scope
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------------------
# Decode after a pruned prefill == the masked reference
# ------------------------------------------------------------------------------------------------------------

_DECODE_CASES = [  # family, config overrides, attention implementation, dtype, atol
    ("llama", {}, "sdpa", torch.float64, 1e-9),
    ("llama", {}, "sdpa", torch.float32, 1e-4),
    ("llama", {}, "eager", torch.float64, 1e-5),  # HF's eager softmax runs in float32 whatever the dtype
    ("mistral", {"sliding_window": 40}, "sdpa", torch.float64, 1e-9),  # window < prompt: sliding cache layers
    ("qwen2", {}, "sdpa", torch.float64, 1e-9),
    ("qwen3", {}, "sdpa", torch.float64, 1e-9),
    ("phi3", {}, "sdpa", torch.float64, 1e-9),
]


@pytest.mark.parametrize(
    ("family", "overrides", "attn", "dtype", "atol"),
    _DECODE_CASES,
    ids=[f"{f}-{a}{'-sw' if o else ''}-{str(d)[6:]}" for f, o, a, d, _ in _DECODE_CASES],
)
def test_decode_after_pruned_prefill_matches_reference(
    family: str, overrides: dict[str, Any], attn: str, dtype: torch.dtype, atol: float
) -> None:
    model = tiny(family, layers=5, attn=attn, **overrides).to(dtype)
    n, steps = 96, 4
    ids = prompt(n, seed=3)
    keep = [1.0, 1.0, 0.5, 0.5, 0.25]
    with torch.no_grad():
        dense_first = model(ids).logits[0, -1]
        handle = apply(model, keep=keep, window=8, sinks=4, min_prompt_tokens=16)
        try:
            out = model(ids, use_cache=True)
            cache = output_cache(out)
            logits = [out.logits[0, -1]]
            kept = [k.clone() for k in handle.last_kept_indices]
            prefill_rows = out.logits[0]
            tokens = []
            for _ in range(steps):
                tok = logits[-1].argmax()
                tokens.append(int(tok))
                out = model(tok.view(1, 1), **cache_arg(model, cache), use_cache=True)
                logits.append(out.logits[0, -1])
            assert [cache.get_seq_length(i) for i in range(5)] == [c + steps for c in kept_counts(keep, n)]
            generated = model.generate(ids, max_new_tokens=steps + 1, do_sample=False)
        finally:
            handle.remove()
        assert generated[0, n:].tolist() == tokens + [int(logits[-1].argmax())]
        full = torch.cat([ids, torch.tensor([tokens])], dim=1)
        ref = _reference_logits(model, full, kept, n, sliding_window=overrides.get("sliding_window"))
    torch.testing.assert_close(prefill_rows, ref[kept[-1]], atol=atol, rtol=0)
    torch.testing.assert_close(torch.stack(logits), ref[n - 1:], atol=atol, rtol=0)
    assert not torch.allclose(logits[0], dense_first, atol=1e-3)  # the drops did change something


def test_cache_crop_and_multi_token_continuation_keep_positions() -> None:
    """Assisted decoding crops the cache and feeds several tokens at once; the per-layer slot bookkeeping must
    follow (re-feeding a cropped token reproduces its logits exactly)."""
    model = tiny("llama", layers=5).double()
    n = 96
    with torch.no_grad():
        handle = apply(model, keep=[1.0, 1.0, 0.5, 0.5, 0.25], min_prompt_tokens=16)
        try:
            out = model(prompt(n, seed=3))
            cache = output_cache(out)
            tokens, logits = [], []
            tok = out.logits[0, -1].argmax()
            for _ in range(3):
                tokens.append(tok)
                logits.append(model(tok.view(1, 1), **cache_arg(model, cache)).logits[0, -1])
                tok = logits[-1].argmax()
            cache.crop(-2)
            assert handle.kv_lengths() == [97, 97, 49, 49, 25]
            assert torch.equal(model(tokens[1].view(1, 1), **cache_arg(model, cache)).logits[0, -1], logits[1])
            pair = torch.stack([tokens[2], logits[2].argmax()]).view(1, 2)
            two = model(pair, **cache_arg(model, cache)).logits[0]
            torch.testing.assert_close(two[0], logits[2], atol=1e-9, rtol=0)
            # a left-padded prompt at batch 1: padding is masked out of every pruned layer, no NaN
            mask = torch.ones(1, n, dtype=torch.long)
            mask[0, :5] = 0
            assert not model(prompt(n, seed=3), attention_mask=mask).logits.isnan().any()
        finally:
            handle.remove()


# ------------------------------------------------------------------------------------------------------------
# The attention scorer == explicit eager attention
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_scores_equal_eager_attention(family: str) -> None:
    model = tiny(family, layers=5)
    n, w = 88, 6
    ids = prompt(n, seed=5)
    keep = [1.0, 1.0, 0.5, 0.5, 0.3]  # scoring layers 1 (dense rows) and 3 (after a drop)
    handle = apply(model, keep=keep, window=w, sinks=2, min_prompt_tokens=8)
    try:
        with torch.no_grad():
            model(ids)
        kept = [k.clone() for k in handle.last_kept_indices]
        scores = {layer: s.clone() for layer, s in handle.last_scores.items()}
    finally:
        handle.remove()
    assert sorted(scores) == [1, 3]
    model.set_attn_implementation("eager")
    weights: dict[int, torch.Tensor] = {}
    _reference_logits(model, ids, kept, n, capture=weights)
    for layer in (1, 3):
        rows = kept[layer]
        # attention of the layer's last w query rows over its own rows, averaged over heads and queries
        expected = weights[layer][0][:, rows[-w:]][:, :, rows].mean(dim=(0, 1))
        torch.testing.assert_close(scores[layer], expected, atol=1e-6, rtol=1e-5)
        assert math.isclose(float(scores[layer].sum()), 1.0, rel_tol=1e-5)
        # and the next layer kept the protected rows plus the best-scored others
        droppable = droppable_mask(rows, n, 2, w, None)
        chosen = select_kept(expected, droppable, len(kept[layer + 1]))
        assert rows[chosen].tolist() == kept[layer + 1].tolist()


# ------------------------------------------------------------------------------------------------------------
# Through apply_policy
# ------------------------------------------------------------------------------------------------------------


def test_apply_policy_generates_with_the_schedule() -> None:
    model = tiny("mistral")
    ids = prompt(70)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=3, do_sample=False)
        section = {"keep": [1.0, 0.5, 0.5, 0.5], "scorer": "attention", "window": 4, "sinks": 4}
        policy = make_policy_dict(model_fingerprint(model), techniques={"token_retention": section})
        with apply_policy(model, policy) as tuned:
            out = tuned.generate(ids, max_new_tokens=3)
            assert out.shape == dense.shape
        assert model.config._attn_implementation == "sdpa" and _no_hooks(model)
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), dense)


def test_pool_scores_take_the_best_droppable_neighbour() -> None:
    scores = torch.tensor([9.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 8.0])
    droppable = torch.tensor([False, True, True, True, True, True, True, True, False])
    assert torch.equal(pool_scores(scores, droppable, 1), scores)  # kernel 1: off
    pooled = pool_scores(scores, droppable, 3)
    # each droppable row: max of itself and its droppable neighbours; protected rows neither give nor take
    assert pooled.tolist() == [9.0, 0.0, 5.0, 5.0, 5.0, 0.0, 1.0, 1.0, 8.0]
    assert pool_scores(scores, droppable, 5).tolist() == [9.0, 5.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 8.0]


def test_pooled_scores_keep_a_span_around_its_best_token() -> None:
    model = tiny("llama")
    n, spike = 80, 40
    handle = apply(model, keep=[1.0, 0.2, 0.2, 0.2], scorer="l2norm", window=4, sinks=2, pool=7,
                   min_prompt_tokens=8)
    # one token stands out, its neighbours score worst: only pooling keeps them
    handle.score_override = lambda layer, hidden, slots: torch.where(slots == spike, 100.0, -slots.float())
    try:
        with torch.no_grad():
            model(prompt(n))
        kept = set(handle.last_kept_indices[1].tolist())
        assert set(range(spike - 3, spike + 4)) <= kept
    finally:
        handle.remove()


def test_an_even_pool_kernel_is_refused_with_its_field() -> None:
    problems = TokenRetentionConfig.section_problems({"keep": [1.0, 0.5], "pool": 4}, "techniques.token_retention")
    assert problems == ["techniques.token_retention.pool: must be an odd kernel size (the row itself plus as many "
                        "on each side), got 4"]
