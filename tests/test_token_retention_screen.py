"""The ranking screen: hit rates per candidate ranking on builtin:tiny, the model left as it was, and the study
starts it adds to the presets."""

import pytest
import torch

from search_spaces import get_search_space
from search_spaces.base import SearchContext
from search_spaces.token_retention import TokenRetentionState, screen_candidates
from search_spaces.token_retention_screen import RankingScreen, candidates, screen_rankings
from tuner.models import load_model
from tuner.quality import QualityConfig
from tuner.workload import TunerInputs


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny", torch.device("cpu"))


@pytest.fixture(scope="module")
def prompts(tiny):
    inputs = TunerInputs(QualityConfig(tasks=("needle",), examples_per_task=4, seed=3))
    return inputs.task_prompts(tiny.tokenizer, 1, torch.device("cpu"))


def test_task_prompts_are_the_trials_first_examples(tiny, prompts):
    assert len(prompts) == 1 and prompts[0][0].shape[0] == 1 and prompts[0][1] > 0
    assert TunerInputs().task_prompts(tiny.tokenizer, 2, torch.device("cpu")) == []


def test_hit_rates_per_candidate_and_the_model_is_left_as_it_was(tiny, prompts):
    before = tiny.model.config._attn_implementation
    ids = prompts[0][0]
    with torch.inference_mode():
        dense = tiny.model(ids).logits
    cands = candidates(("attention", "l2norm"), (1, 8), (1, 7))
    screen = screen_rankings(tiny.model, prompts, cands, keep=0.25)
    assert tiny.model.config._attn_implementation == before
    with torch.inference_mode():
        assert torch.equal(tiny.model(ids).logits, dense)
    assert screen.n_examples == 1 and set(screen.hit_rate) == {c.key for c in cands}
    assert all(0.0 <= v <= 1.0 for v in screen.hit_rate.values())
    everything = screen_rankings(tiny.model, prompts, cands, keep=1.0)  # keeping every row hits every row
    assert set(everything.hit_rate.values()) == {1.0}


def test_best_prefers_the_higher_hit_rate_then_the_earlier_candidate():
    cands = candidates(("attention",), (8, 32), (1, 15))
    screen = RankingScreen(hit_rate={"attention/w8/p1": 0.9, "attention/w8/p15": 0.98, "attention/w32/p15": 0.98})
    assert screen.best(cands).key == "attention/w8/p15"


def test_screened_study_starts_need_the_screen():
    space = get_search_space("token_retention")
    ctx = SearchContext(model_fingerprint={"num_layers": 30}, workload={"prompt_tokens": 2048, "new_tokens": 16},
                        device={"id": "cpu"})
    names = [p.name for p in space.presets(ctx)]
    assert names == ["fastv", "pmod", "pyramiddrop", "pyramiddrop-snapkv"]  # bench: no prepare, no screen
    best = {"attention/w32/p15": 0.97, "attention/w8/p1": 0.9}
    ctx.prepared["token_retention"] = TokenRetentionState(calibration=None, screen=RankingScreen(hit_rate=best))
    screened = space.presets(ctx)[4:]
    assert [p.name for p in screened] == ["pyramiddrop+screen"]  # no calibration: no cost-model-chosen lambda
    section = screened[0].section
    assert (section["scorer"], section["window"], section["pool"]) == ("attention", 32, 15)
    assert section["keep"] == space.presets(ctx)[2].section["keep"]
    assert len(screen_candidates()) == 2 * 5 * 4
