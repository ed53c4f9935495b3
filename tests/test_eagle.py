"""EAGLE draft heads: lossless drafting, the head's bookkeeping against a by-hand computation, the published
layouts, the draft vocabulary, and the policy section."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from policies.draft_heads import DraftVocabulary, EagleHead, HeadFormatError, load_head, save_head
from policies.drafters import EagleDrafter, Sampling
from policies.speculative import SpeculativeStats, speculative_generate
from profilers.model_parts import decoder_parts

pytestmark = pytest.mark.hf_internals  # hooks, caches and masks of transformers: also run on the oldest release

VOCAB = 96


def _random_lm(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    return model.eval()


def _generate(target, ids, n, drafter, **kwargs):
    """`speculative_generate` with EOS handled as `generate` handles it (suppressed below min_new_tokens)."""
    return speculative_generate(target, ids, n, drafter, min_new_tokens=n, eos_token_id=target.config.eos_token_id,
                                **kwargs)


def _head(target, seed: int = 1, scale: float = 1.0) -> EagleHead:
    """A random head; `scale` > 1 sharpens its draft distributions (random heads are otherwise near-uniform)."""
    torch.manual_seed(seed)
    head = EagleHead(target.config)
    with torch.no_grad():
        head.fc.weight.mul_(scale)
    return head.eval()


def _dense(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)


def _prompt(seed: int = 5, n: int = 20) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, n))
    return torch.cat([ids, ids[:, :10]], dim=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
@pytest.mark.parametrize("vocab", [None, 40])
def test_eagle_drafter_is_lossless_on_random_targets(kind, tree, vocab):
    target = _random_lm(kind)
    head = _head(target)
    head.vocab_rank = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
    if tree == "dynamic":
        drafter = EagleDrafter(target, head, None, dynamic_depth=3, dynamic_topk=2, dynamic_tokens=5,
                               vocab_size=vocab)
    else:
        shape = [-1, 0, 1, 2] if tree == "chain" else [-1, -1, 0, 0, 1, 2]
        drafter = EagleDrafter(target, head, shape, vocab_size=vocab)
    ids = _prompt()
    try:
        spec = _generate(target, ids, 30, drafter)
    finally:
        drafter.close()
    assert torch.equal(spec, _dense(target, ids, 30))


def _features(target, ids: list[int]) -> torch.Tensor:
    """The target's post-norm last hidden states over `ids`, teacher-forced."""
    with torch.inference_mode():
        return decoder_parts(target).base(torch.tensor([ids])).last_hidden_state[0]


def _chain_by_hand(target, head, context: list[int], depth: int) -> list[int]:
    """What a greedy EAGLE chain drafts after `context`, recomputed from scratch with no cache: pairs (f_t,
    x_{t+1}) from the true features, then the head's own outputs fed back, one pair per drafted token."""
    parts = decoder_parts(target)
    feats = list(_features(target, context[:-1]).unbind(0))
    tokens = list(context[1:])
    drafted: list[int] = []
    with torch.inference_mode():
        for _ in range(depth):
            out = head(torch.stack(feats)[None], parts.embed(torch.tensor([tokens])))[0]
            token = int(parts.lm_head(out[-1]).argmax())
            drafted.append(token)
            feats.append(out[-1])
            tokens.append(token)
    return drafted


class _Recording(EagleDrafter):
    """Keeps every context it was asked to draft after, and what it drafted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[int], list[int]]] = []

    def propose(self, context, sampling, generator):
        draft = super().propose(context, sampling, generator)
        self.calls.append((list(context), list(draft.tokens)))
        return draft


def test_every_chain_equals_the_by_hand_computation_and_the_head_cache_holds_committed_pairs_only():
    target = _random_lm("llama")
    head = _head(target, scale=8.0)
    drafter = _Recording(target, head, [-1, 0, 1])
    ids = _prompt()
    stats = SpeculativeStats()
    try:
        _generate(target, ids, 24, drafter, stats=stats)
    finally:
        drafter.close()
    assert len(drafter.calls) == stats.steps >= 3
    for context, drafted in drafter.calls:
        assert drafted == _chain_by_hand(target, head, context, 3)
    # after the last commit: the committed pairs only (every position but the last token's), no tree entries
    assert drafter.kv.get_seq_length() == drafter.n_cached == len(drafter.calls[-1][0]) - 1


def test_the_accepted_path_feeds_the_next_step():
    """A drafter whose tree is the dense continuation (the head still runs, for its bookkeeping): every node is
    accepted, and the head's next context is the root plus the accepted nodes, with the target's features."""
    from policies.drafters import Draft

    target = _random_lm("llama")
    head = _head(target)
    ids = _prompt()
    dense = _dense(target, ids, 20)[0].tolist()

    class Oracle(_Recording):
        def propose(self, context, sampling, generator):
            super().propose(context, sampling, generator)
            n = len(context)
            return Draft([-1, 0, 1, 2], dense[n:n + 4]) if n + 4 <= len(dense) else Draft([], [])

    oracle = Oracle(target, head, [-1, 0, 1, 2])
    stats = SpeculativeStats()
    try:
        out = _generate(target, ids, 20, oracle, stats=stats)
    finally:
        oracle.close()
    assert out[0].tolist() == dense
    assert stats.accepted_per_step[:3] == [4, 4, 4]
    for context, drafted in oracle.calls:  # the head's own chain, computed after each accepted path
        assert drafted == _chain_by_hand(target, head, context, 4)


def test_sampling_with_the_head_is_reproducible_with_a_seed():
    target = _random_lm("qwen2")
    head = _head(target, scale=4.0)
    outs = []
    for _ in range(2):
        drafter = EagleDrafter(target, head, None, dynamic_depth=3, dynamic_topk=2, dynamic_tokens=4)
        try:
            outs.append(_generate(target, _prompt(), 16, drafter, sampling=Sampling(temperature=0.8),
                                  generator=torch.Generator().manual_seed(7)))
        finally:
            drafter.close()
    assert torch.equal(outs[0], outs[1])


def test_close_removes_the_feature_hook():
    target = _random_lm("llama")
    norm = decoder_parts(target).norm
    before = len(norm._forward_hooks)
    drafter = EagleDrafter(target, _head(target), [-1, 0])
    assert len(norm._forward_hooks) == before + 1
    drafter.close()
    assert len(norm._forward_hooks) == before


def test_draft_vocabulary_scores_only_its_tokens():
    target = _random_lm("llama")
    lm_head = decoder_parts(target).lm_head
    rank = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 64)
    full = DraftVocabulary.build(lm_head, rank, None).logits(hidden)
    sub = DraftVocabulary.build(lm_head, rank, 10).logits(hidden)
    kept = rank[:10]
    assert torch.allclose(sub[:, kept], full[:, kept], atol=1e-5)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[kept] = False
    assert torch.isinf(sub[:, outside]).all()
    with pytest.raises(HeadFormatError, match="ranking"):
        DraftVocabulary.build(lm_head, None, 10)


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_greedy_drafts_over_the_scored_tokens_equal_drafts_over_the_full_masked_logits(tree):
    """A greedy draft ranks only the draft vocabulary's logits (no full-vocabulary tensor); its tree, tokens
    and order are those of ranking the full logits with -inf outside the draft vocabulary."""
    target = _random_lm("llama")
    head = _head(target, scale=4.0)
    head.vocab_rank = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
    ids = _prompt()

    def draft(compact: bool):
        kwargs = dict(dynamic_depth=3, dynamic_topk=3, dynamic_tokens=7) if tree == "dynamic" else {}
        drafter = EagleDrafter(target, head, None if tree == "dynamic" else [-1, -1, 0, 0, 1, 2], vocab_size=24,
                               **kwargs)
        if not compact:
            drafter._scored_ids = None  # the reference: full-vocabulary logits, -inf off the draft vocabulary
        try:
            with torch.inference_mode():
                drafter.begin(ids)
                target(ids)
                drafter.observe(ids[0], None)
                return drafter.propose(ids[0].tolist() + [7], Sampling(), None)  # the first new token: 7
        finally:
            drafter.close()

    fast, reference = draft(True), draft(False)
    assert (fast.parents, fast.tokens) == (reference.parents, reference.tokens)
    assert set(fast.tokens) <= set(head.vocab_rank[:24].tolist())


# -- checkpoint layouts ---------------------------------------------------------------------------------------
def _outputs(head: EagleHead) -> torch.Tensor:
    torch.manual_seed(9)
    feats, embeds = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.inference_mode():
        return head(feats, embeds)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_native_save_and_load_round_trip(tmp_path, kind):
    target = _random_lm(kind)
    head = _head(target)
    head.vocab_rank = torch.arange(VOCAB).flip(0)
    save_head(head, tmp_path / "head", target.config, metadata={"note": "test"}, dtype=torch.float32)
    loaded = load_head(tmp_path / "head", target)
    assert torch.equal(_outputs(loaded), _outputs(head))
    assert torch.equal(loaded.vocab_rank, head.vocab_rank)
    assert json.loads((tmp_path / "head" / "config.json").read_text())["architectures"] == ["EagleHead"]


def _eagle1_checkpoint(tmp_path, target, head: EagleHead, *, bias: bool, torch_bin: bool):
    """A head written the way EAGLE-1/2's repository writes one: its config, the target's embedding copied
    in, `fc.bias` only with bias, pytorch_model.bin or safetensors."""
    from safetensors.torch import save_file

    out = tmp_path / "eagle1"
    out.mkdir()
    cfg = target.config
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": 1, "rms_norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size, "max_position_embeddings": 512, "hidden_act": "silu"}
    if not bias:
        config["bias"] = False
    (out / "config.json").write_text(json.dumps(config))
    tensors = dict(head.eagle_state_dict())
    tensors["embed_tokens.weight"] = decoder_parts(target).embed.weight.detach().clone()
    if torch_bin:
        torch.save(tensors, out / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("bias,torch_bin", [(True, True), (False, False)])
def test_eagle1_layout_loads(tmp_path, bias, torch_bin):
    target = _random_lm("llama")
    torch.manual_seed(2)
    head = EagleHead(target.config, bias=bias).eval()
    path = _eagle1_checkpoint(tmp_path, target, head, bias=bias, torch_bin=torch_bin)
    loaded = load_head(path, target)
    assert loaded.bias == bias and loaded.vocab_rank is None
    assert torch.equal(_outputs(loaded), _outputs(head))


def _eagle3_checkpoint(tmp_path, target, draft_vocab: int = 40):
    """A random EAGLE-3 head written in EAGLE-3's layout: config with draft_vocab_size, `midlayer.*`, `norm`,
    `lm_head` over the draft vocabulary, d2t offsets (draft ids sorted by target id) and the t2d mask."""
    from safetensors.torch import save_file

    from policies.draft_heads import Eagle3Head

    cfg = target.config
    config = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": cfg.hidden_size,
              "intermediate_size": 96, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": 1, "rms_norm_eps": 1e-5,
              "vocab_size": cfg.vocab_size, "draft_vocab_size": draft_vocab, "max_position_embeddings": 512}
    torch.manual_seed(4)
    head = Eagle3Head(cfg, config).eval()
    with torch.no_grad():
        head.fc.weight.mul_(4.0)
    used = sorted(torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(1))[:draft_vocab].tolist())
    d2t = torch.tensor(used) - torch.arange(draft_vocab)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[used] = True
    out = tmp_path / "eagle3"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in head.eagle3_state_dict().items()}
    save_file({**tensors, "d2t": d2t, "t2d": t2d}, str(out / "model.safetensors"))
    return out, head, used


def test_eagle3_layout_loads_maps_its_vocabulary_and_drafts_losslessly(tmp_path):
    target = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)).eval()
    path, written, used = _eagle3_checkpoint(tmp_path, target)
    head = load_head(path, target)
    assert head.tap_layers == (2, 3, 3)
    assert head.draft_to_target.tolist() == used
    feats, embeds = torch.randn(1, 4, 192), torch.randn(1, 4, 64)
    with torch.inference_mode():
        hidden = head(feats, embeds)
        assert torch.equal(hidden, written(feats, embeds))
        logits = head.logits(hidden[0])
    assert torch.isinf(logits[:, [t for t in range(VOCAB) if t not in used]]).all()
    assert torch.isfinite(logits[:, used]).all()
    ids = _prompt()
    for tree in ([-1, 0, 1], None):
        drafter = EagleDrafter(target, head, tree, dynamic_depth=3, dynamic_topk=2, dynamic_tokens=4)
        try:
            assert torch.equal(_generate(target, ids, 24, drafter), _dense(target, ids, 24))
        finally:
            drafter.close()
    with pytest.raises(HeadFormatError, match="vocab: null"):
        EagleDrafter(target, head, [-1], vocab_size=16)


def test_bad_head_files_are_refused_with_one_line(tmp_path):
    target = _random_lm("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(HeadFormatError, match="neither") as info:
        load_head(empty, target)
    assert "\n" not in str(info.value)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"hidden_size": 64}))
    torch.save({"fc.weight": torch.zeros(1), "code": print}, pickled / "pytorch_model.bin")
    with pytest.raises(HeadFormatError, match="not a plain tensor file"):
        load_head(pickled, target)

    other = tmp_path / "wide"
    head = EagleHead(_random_lm("llama").config)
    save_head(head, other, target.config)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(HeadFormatError, match="hidden_size"):
        load_head(other, wide)
