"""The masked-diffusion decode loop (`policies.diffusion_blocks`): exactness, block discipline, progress, termination,
determinism, the block KV cache, validation and the model-kind guard."""

from __future__ import annotations

import itertools

import pytest
import torch

from policies.diffusion_blocks import (
    BlockKV,
    DiffusionConfig,
    DiffusionStats,
    baseline_config,
    denoiser_for,
    diffusion_generate,
    supports_block_cache,
    transfer_schedule,
)
from policies.model_kind import model_kind
from policies.registry import get_runtime
from policies.schema import PolicyError
from profilers.hf_compat import cache_arg

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals

VOCAB, MASK, NEWLINE = 64, 63, 10


def denoiser(shift: bool, seed: int = 0):
    """A random-init Llama-layout bidirectional masked LM (EuroBERT), small enough for exhaustive grids."""
    from transformers import EuroBertConfig, EuroBertForMaskedLM

    config = EuroBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=MASK, logits_shift=shift)
    torch.manual_seed(seed)
    return EuroBertForMaskedLM(config).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "shifted"])
def model(request):
    return denoiser(request.param)


def prompt(n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, MASK, (1, n), generator=torch.Generator().manual_seed(seed))


def run(model, cfg: DiffusionConfig, new: int = 20, **kw) -> tuple[torch.Tensor, DiffusionStats]:
    stats = DiffusionStats()
    out = diffusion_generate(model, prompt(), new, cfg, stats=stats, **kw)
    return out, stats


def canvases(model, cfg: DiffusionConfig, new: int) -> tuple[list[torch.Tensor], torch.Tensor, DiffusionStats]:
    """The canvas each forward saw (cache off, so every forward sees the whole sequence) and the output."""
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"]).clone()), with_kwargs=True)
    try:
        out, stats = run(model, cfg, new)
    finally:
        hook.remove()
    return seen, out, stats


def test_schedule_is_llada_linear():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(3, 8) == [1, 1, 1]
    assert sum(transfer_schedule(31, 7)) == 31


def test_threshold_one_with_one_token_per_step_equals_the_baseline(model):
    base, base_stats = run(model, baseline_config(), new=40)
    same, stats = run(model, DiffusionConfig(threshold=1.0, steps_per_block=32), new=40)
    assert torch.equal(base, same)
    assert stats.committed == base_stats.committed == [1] * 40
    assert base_stats.forwards == 40 and base_stats.blocks == [(0, 32), (32, 40)]


def test_baseline_is_the_dense_decode_of_a_diffusion_model(model):
    from policies import apply_policy

    with apply_policy(model, None) as dense:
        out = dense.generate(prompt(), max_new_tokens=20, min_new_tokens=20, attention_mask=torch.ones(1, 9))
    assert torch.equal(out, run(model, baseline_config(), 20)[0])


@pytest.mark.parametrize("cfg", [
    DiffusionConfig(block_length=4, steps_per_block=2),
    DiffusionConfig(block_length=8, steps_per_block=None, threshold=0.05),
    DiffusionConfig(block_length=5, steps_per_block=None, threshold=0.2, remasking="random"),
], ids=["steps", "threshold", "random"])
def test_no_position_outside_the_current_block_is_decoded(model, cfg):
    seen, out, stats = canvases(model, cfg, new=18)
    after = seen[1:] + [out]
    blocks = [b for b, n in zip(stats.blocks, stats.block_forwards, strict=True) for _ in range(n)]
    assert len(blocks) == len(seen) == stats.forwards
    offset = prompt().shape[1]
    for (start, end), before, now in zip(blocks, seen, after, strict=True):
        changed = (before[0] != now[0]).nonzero().flatten().tolist()
        assert changed and all(offset + start <= p < offset + end for p in changed)
        assert (before[0, offset + end:] == MASK).all()  # nothing after the block was touched yet
    assert all(end - start <= cfg.block_length for start, end in stats.blocks)


def test_adaptive_blocks_move_the_end_only_to_a_confident_delimiter():
    model = denoiser(False)
    # make the newline the most likely token everywhere: every block then ends right after its first position
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        model.lm_head.bias[NEWLINE] = 50.0
    cfg = DiffusionConfig(block_length=8, threshold=0.9, steps_per_block=None, delimiter_threshold=0.3,
                          delimiter_ids=(NEWLINE,))
    out, stats = run(model, cfg, new=6)
    assert stats.blocks == [(i, i + 1) for i in range(6)]
    never = DiffusionConfig(block_length=8, threshold=0.9, steps_per_block=None, delimiter_threshold=0.3,
                            delimiter_ids=(NEWLINE + 1,))
    assert run(model, never, new=12)[1].blocks == [(0, 8), (8, 12)]


def test_adaptive_block_may_end_past_the_default_block_within_the_window():
    from policies.diffusion_blocks import _adaptive_length

    tokens = torch.tensor([5, 5, 5, 5, 5, NEWLINE, 5, 5, 5, NEWLINE])
    probs = torch.full((10, VOCAB), 0.001)
    probs[torch.arange(10), tokens] = 0.5
    cfg = DiffusionConfig(block_length=4, steps_per_block=4, delimiter_threshold=0.3, delimiter_ids=(NEWLINE,),
                          max_block_length=8)
    assert _adaptive_length(tokens, probs, 4, cfg) == 6  # moved past the default 4, to the newline
    assert _adaptive_length(tokens, probs, 4, DiffusionConfig(**{**cfg.__dict__, "max_block_length": 5})) == 4
    assert _adaptive_length(tokens, probs, 4, DiffusionConfig(**{**cfg.__dict__, "delimiter_threshold": 0.6})) == 4


SETTINGS = list(itertools.product(
    (1, 3, 64),            # block length: 1, uneven (with adaptive ends), longer than the generation
    (None, 0.0001, 1.0),   # threshold: none (fixed schedule), commit-everything, never
    ("none", "prefix", "dual"),
))


@pytest.mark.parametrize("block,threshold,cache", SETTINGS)
def test_loop_terminates_with_at_least_one_token_per_forward(model, block, threshold, cache):
    for rule in ("low_confidence", "random", "margin", "entropy"):
        steps = None if threshold is not None else max(1, block // 2)
        cfg = DiffusionConfig(block_length=block, steps_per_block=steps, threshold=threshold, remasking=rule,
                              cache=cache, delimiter_threshold=0.5 if block == 3 else None,
                              delimiter_ids=(NEWLINE,) if block == 3 else ())
        out, stats = run(model, cfg, new=13)
        assert out.shape == (1, 9 + 13) and not (out[0, 9:] == MASK).any()
        assert torch.equal(out[:, :9], prompt())
        assert min(stats.committed) >= 1 and stats.tokens == 13 and stats.forwards <= 13
        assert stats.forwards == len(stats.committed) == sum(stats.block_forwards)


def test_fixed_schedule_runs_exactly_its_steps(model):
    out, stats = run(model, DiffusionConfig(block_length=8, steps_per_block=2), new=16)
    assert stats.forwards == 4 and stats.committed == [4, 4, 4, 4]


def test_deterministic_with_a_seed(model):
    cfg = DiffusionConfig(block_length=8, steps_per_block=4, remasking="random", seed=3)
    a, b = run(model, cfg)[0], run(model, cfg)[0]
    assert torch.equal(a, b)
    sampled = [run(model, cfg, do_sample=True, temperature=1.0, seed=s)[0] for s in (5, 5, 6)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_block_cache_is_exact_for_the_positions_it_recomputes(model):
    assert supports_block_cache(model)
    ids = prompt(14)
    kv = BlockKV()
    with torch.inference_mode():
        full = model(ids, **cache_arg(model, kv)).logits
        kv.keep_outside(5, 9)
        part = model(ids[:, 5:9], **cache_arg(model, kv), position_ids=torch.arange(5, 9)[None]).logits
    assert torch.allclose(part, full[:, 5:9], atol=1e-5)


def test_cache_is_approximate_but_close_to_no_cache(model):
    exact = run(model, DiffusionConfig(block_length=4, steps_per_block=4), new=16)[0]
    for cache in ("prefix", "dual"):
        cached = run(model, DiffusionConfig(block_length=4, steps_per_block=4, cache=cache), new=16)[0]
        assert cached.shape == exact.shape and not (cached == MASK).any()


def test_the_cache_probe_is_generic_and_refuses_models_that_ignore_it():
    from transformers import BertConfig, BertForMaskedLM, EuroBertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)).eval()
    assert model_kind(bert) == "masked-diffusion" and supports_block_cache(bert)  # BERT's attention takes a Cache

    class NoCache(EuroBertForMaskedLM):  # a model whose forward drops the cache and the positions
        def forward(self, input_ids=None, past_key_values=None, cache=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    plain = denoiser(False)
    blind = NoCache(plain.config).eval()
    blind.load_state_dict(plain.state_dict())
    assert not supports_block_cache(blind)
    runtime = get_runtime("diffusion_blocks")
    with pytest.raises(PolicyError, match="cache"):
        runtime.apply(blind, {"cache": "prefix"})
    out = runtime.apply(blind, {"block_length": 4, "steps_per_block": 4}).generate(blind, prompt(), max_new_tokens=6)
    assert out.shape == (1, 15) and not (out == MASK).any()


def test_denoiser_reads_mask_and_shift():
    assert denoiser_for(denoiser(True)).shift and not denoiser_for(denoiser(False)).shift
    assert denoiser_for(denoiser(False)).mask_id == MASK


@pytest.mark.parametrize("section,field", [
    ({"block_length": 0}, "block_length"),
    ({"steps_per_block": None}, "steps_per_block"),
    ({"steps_per_block": 0}, "steps_per_block"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": 0}, "threshold"),
    ({"remasking": "lowest"}, "remasking"),
    ({"cache": "full"}, "cache"),
    ({"delimiter_threshold": 0.3}, "delimiter_ids"),
    ({"delimiter_ids": ["\n"]}, "delimiter_ids"),
    ({"block_length": 8, "max_block_length": 4}, "max_block_length"),
    ({"seed": -1}, "seed"),
    ({"blocks": 3}, "blocks"),
])
def test_bad_sections_are_refused_naming_the_field(section, field):
    problems = DiffusionConfig.section_problems(section, "techniques.diffusion_blocks")
    assert problems and any(p.startswith(f"techniques.diffusion_blocks.{field}") for p in problems)


def test_good_section_validates():
    good = {"block_length": 16, "steps_per_block": None, "threshold": 0.9, "remasking": "margin",
            "delimiter_threshold": 0.3, "delimiter_ids": [10], "cache": "dual", "seed": 1}
    assert DiffusionConfig.section_problems(good, "x") == []


def test_padded_batches_are_refused(model):
    from policies.diffusion_blocks import generate_with

    with pytest.raises(ValueError, match="padded"):
        generate_with(model, prompt(), baseline_config(), None, max_new_tokens=4,
                      attention_mask=torch.tensor([[0] + [1] * 8]))
    with pytest.raises(ValueError, match="batch 1"):
        diffusion_generate(model, prompt().repeat(2, 1), 4, baseline_config())


def test_shorter_blocks_keep_the_tokens_per_forward():
    cfg = DiffusionConfig(block_length=8, steps_per_block=2)  # 4 tokens per forward
    assert [cfg.steps_for(n) for n in (8, 4, 3, 16)] == [2, 1, 1, 4]
    assert baseline_config().steps_for(6) == 6


def test_denoiser_profile_measures_full_and_windowed_forwards(model):
    from search_spaces.diffusion_blocks_profiler import profile_denoiser

    rows = profile_denoiser(model, torch.device("cpu"), seq_lens=(24, 12), kv_tokens=16, windows=(2, 8),
                            warmup=1, repeats=2)
    assert [r["n_query"] for r in rows["full"]] == [12, 24] and all(r["n_kv"] == 0 for r in rows["full"])
    assert [(r["n_query"], r["n_kv"]) for r in rows["window"]] == [(2, 16), (8, 16)]
    assert all(r["ms"] > 0 for r in rows["full"] + rows["window"])
    assert profile_denoiser(model, torch.device("cpu"), seq_lens=(8,), kv_tokens=4, cache=False,
                            warmup=0, repeats=1)["window"] == []
