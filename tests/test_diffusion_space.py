"""The `diffusion_blocks` search space: sections it samples are valid, presets are what the papers say, and the
cost hook counts forwards exactly for fixed schedules and prices cached forwards from the profile."""

from __future__ import annotations

import optuna
import pytest

from policies.diffusion_blocks import DiffusionConfig
from search_spaces import SearchContext, get_search_space
from search_spaces.diffusion_blocks import THRESHOLD_GRID, DiffusionCalibration, newline_ids, section


class Tok:
    """A tokenizer stand-in: ids 0-9, where 3 and 7 decode to text ending in a newline."""

    all_special_ids = [0]

    def __len__(self) -> int:
        return 10

    def decode(self, ids: list[int]) -> str:
        return "x\n" if ids[0] in (3, 7) else "x"


def ctx(cache: bool = True) -> SearchContext:
    profile = {"full": [{"n_query": 1056, "n_kv": 0, "ms": 80.0}],
               "window": [{"n_query": q, "n_kv": 1024, "ms": 2.0 + 0.1 * q} for q in (2, 4, 8, 16, 33, 64)]}
    forwards = {str(b): [0.5 + 0.1 * i for i in range(len(THRESHOLD_GRID))] for b in (4, 8, 16, 32, 64)}
    calibration = DiffusionCalibration(delimiter_ids=newline_ids(Tok()), cache_supported=cache, profile=profile,
                                       threshold_forwards=forwards, loop_ms=0.5)
    return SearchContext(model_fingerprint={"num_layers": 6}, device={},
                         workload={"prompt_tokens": 1024, "new_tokens": 32},
                         prepared={"diffusion_blocks": calibration})


def test_every_sampled_section_is_valid():
    space, c = get_search_space("diffusion_blocks"), ctx()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        trial = study.ask()
        doc = space.suggest(trial, c)
        assert DiffusionConfig.section_problems(doc, "s") == [], doc
        if "delimiter_ids" in doc:
            assert doc["delimiter_ids"] == [3, 7]
        study.tell(trial, 0.0)


def test_presets_are_the_papers_and_reproduce_through_suggest():
    space, c = get_search_space("diffusion_blocks"), ctx()
    presets = {p.name: p for p in space.presets(c)}
    assert presets["llada"].section == {"block_length": 32, "remasking": "low_confidence", "cache": "none",
                                        "steps_per_block": 32, "threshold": None}
    assert presets["fast-dllm"].section["threshold"] == 0.9 and presets["fast-dllm"].section["cache"] == "prefix"
    assert presets["adablock"].section["delimiter_threshold"] == 0.3
    for preset in presets.values():
        study = optuna.create_study()
        study.enqueue_trial(preset.params)
        assert space.suggest(study.ask(), c) == preset.section
    assert {p.name: p.section["cache"] for p in space.presets(ctx(cache=False))}["fast-dllm"] == "none"


def test_cost_hook_counts_forwards_and_prices_the_cache():
    space, c = get_search_space("diffusion_blocks"), ctx()
    loop = 0.5
    # baseline: 32 full forwards
    assert space.predict_ms(section(c, 32), c) == pytest.approx(32 * 80.0 + 32 * loop)
    # 4 tokens per forward, no cache: 8 full forwards
    assert space.predict_ms(section(c, 32, tokens_per_step=4), c) == pytest.approx(8 * 80.0 + 8 * loop)
    # prefix cache: one full forward, then 31 windows of 33 tokens
    window = 2.0 + 0.1 * 33
    assert space.predict_ms(section(c, 32, cache="prefix"), c) == pytest.approx(80.0 + 31 * window + 32 * loop)
    # threshold 0.9: the table says 0.8 forwards per token for block 32
    cfg = DiffusionConfig.from_section(section(c, 32, threshold=0.9, cache="prefix"))
    assert space.forwards_per_block(c, cfg, 32) == pytest.approx(0.8 * 32)
    assert space.forwards_per_block(c, DiffusionConfig.from_section(section(c, 32, tokens_per_step=4, threshold=0.9)),
                                    32) == pytest.approx(8)
    # more cache, smaller windows, fewer forwards: never dearer
    costs = [space.predict_ms(section(c, 32, threshold=t, cache="prefix"), c) for t in (0.99, 0.9, 0.7, 0.5)]
    assert costs == sorted(costs, reverse=True)
