"""Token-retention search space: schedule families, paper presets, sections the runtime accepts, cost model."""

from __future__ import annotations

import json
import statistics

import optuna
import pandas as pd
import pytest

from policies.registry import get_runtime
from search_spaces import SearchContext, get_search_space
from search_spaces.token_retention import (
    prd_cosine_schedule,
    stage_boundaries,
    stages_schedule,
    step_schedule,
)

PATH = "techniques.token_retention"


def _ctx(n_layers: int, curves: pd.DataFrame | None = None, objective: str = "ttft_ms",
         baseline: dict[str, float] | None = None, prepared: dict[str, object] | None = None) -> SearchContext:
    return SearchContext(model_fingerprint={"num_layers": n_layers}, workload={"prompt_tokens": 1024, "new_tokens": 8},
                         device={}, curves=curves, objective=objective, baseline=baseline, prepared=prepared or {})


def test_pmod_preset_reproduces_the_published_schedule():
    keep = prd_cosine_schedule(32, alpha=0.5, hi=0.85, lo=0.15)
    assert keep[:8] == [1.0] * 8 and keep[8] == pytest.approx(0.844, abs=1e-3)
    assert keep[23] == pytest.approx(0.156, abs=1e-3) and keep[24:] == [0.15] * 8
    assert statistics.mean(keep) == pytest.approx(0.538, abs=1e-3)  # p-MoD: ~53.8% of the KV cache


def test_pyramiddrop_and_fastv_presets_at_32_layers():
    assert stage_boundaries(32, 3) == [8, 16, 24]
    keep = stages_schedule(32, 3, 0.5)
    assert keep[7] == 1.0 and keep[8] == 0.5 and keep[16] == 0.25 and keep[24] == 0.125
    assert step_schedule(32, 2, 0.5) == [1.0, 1.0] + [0.5] * 30


def test_the_snapkv_ranked_preset_keeps_pyramiddrops_schedule():
    presets = {p.name: p.section for p in get_search_space("token_retention").presets(_ctx(32))}
    snap, pdrop = presets["pyramiddrop-snapkv"], presets["pyramiddrop"]
    assert snap["keep"] == pdrop["keep"] and (pdrop["window"], pdrop["pool"]) == (8, 1)
    assert (snap["window"], snap["pool"]) == (32, 7)


@pytest.mark.parametrize("n_layers", [2, 6, 32])
def test_presets_are_valid_sections_scaled_to_depth(n_layers):
    space, runtime = get_search_space("token_retention"), get_runtime("token_retention")
    presets = space.presets(_ctx(n_layers))
    assert [p.name for p in presets] == ["fastv", "pmod", "pyramiddrop", "pyramiddrop-snapkv"]
    for preset in presets:
        assert len(preset.section["keep"]) == n_layers
        assert runtime.validate(preset.section, PATH) == []


def test_every_sampled_section_is_monotone_and_valid():
    space, runtime = get_search_space("token_retention"), get_runtime("token_retention")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        trial = study.ask()
        section = space.suggest(trial, _ctx(6))
        keep = section["keep"]
        assert keep[0] == 1.0 and all(a >= b for a, b in zip(keep, keep[1:], strict=False))
        assert runtime.validate(section, PATH) == []
        study.tell(trial, 0.0)
    assert {t.params["token_retention.family"] for t in study.trials} == {"step", "stages", "prd_cosine", "sigmoid",
                                                                          "free"}


def _linear_curves(n_layers: int) -> pd.DataFrame:
    rows = []
    for n in (64, 256, 512, 1024):
        for layer in range(n_layers):
            rows.append({"mode": "prefill", "part": "decoder_layer", "layer_index": layer, "n_query_tokens": n,
                         "n_kv_tokens": n, "latency_ms": 0.01 * n, "memory_mb": 0.0})
            rows.append({"mode": "decode", "part": "decoder_layer", "layer_index": layer, "n_query_tokens": 1,
                         "n_kv_tokens": n, "latency_ms": 0.1 + 0.0001 * n, "memory_mb": 0.0})
    return pd.DataFrame(rows)


def test_cost_model_is_calibrated_on_dense_and_monotone_in_tokens():
    space = get_search_space("token_retention")
    ctx = _ctx(4, _linear_curves(4), objective="ttft_ms", baseline={"ttft_ms": 50.0})
    dense = {"keep": [1.0] * 4, "scorer": "attention", "window": 8, "sinks": 4}
    assert space.predict_ms(dense, ctx) == pytest.approx(50.0)  # the offset makes dense exact
    half = dict(dense, keep=[1.0, 0.5, 0.5, 0.5])
    quarter = dict(dense, keep=[1.0, 0.25, 0.25, 0.25])
    # 3 layers x 512 fewer tokens x 0.01 ms/token saved, then 256 more.
    assert space.predict_ms(half, ctx) == pytest.approx(50.0 - 3 * 5.12, abs=1e-6)
    assert space.predict_ms(quarter, ctx) < space.predict_ms(half, ctx)


def test_cost_model_adds_decode_for_end_to_end_latency():
    space = get_search_space("token_retention")
    section = {"keep": [1.0, 0.5, 0.5, 0.5], "scorer": "attention", "window": 8, "sinks": 4}
    ttft = space.predict_ms(section, _ctx(4, _linear_curves(4), objective="ttft_ms", baseline={}))
    e2e = space.predict_ms(section, _ctx(4, _linear_curves(4), objective="latency_ms", baseline={}))
    assert e2e > ttft


# Calibration: the cost model is fitted on real generate calls of reference schedules


def test_reference_schedules_are_valid_and_separate_the_terms():
    from search_spaces.token_retention import _events, reference_schedules

    runtime = get_runtime("token_retention")
    refs = reference_schedules(6)
    assert list(refs) == ["dense", "light", "one_drop", "medium", "steep"]
    for keep in refs.values():
        assert len(keep) == 6 and keep[0] == 1.0 and keep == sorted(keep, reverse=True)
        assert runtime.validate({"keep": keep, "scorer": "attention", "window": 8, "sinks": 4}, PATH) == []
    assert _events([1024] * 6) == (0, 0)
    assert _events([1024, 993, 963, 934, 906, 879]) == (5, 5)
    assert _events([1024, 1024, 512, 512, 128, 128]) == (2, 4)


def test_calibrated_cost_model_charges_drop_points():
    from search_spaces.token_retention import LinearCost, RetentionCalibration, TokenRetentionState

    space = get_search_space("token_retention")
    calibration = RetentionCalibration(prefill=LinearCost(1.0, 0.5, 2.0), decode_step=LinearCost(1.0, 0.01, 0.0))
    ctx = _ctx(4, _linear_curves(4), objective="ttft_ms", baseline={"ttft_ms": 99.0},
               prepared={"token_retention": TokenRetentionState(calibration)})
    dense = {"keep": [1.0] * 4, "scorer": "attention", "window": 8, "sinks": 4}
    assert space.predict_ms(dense, ctx) == pytest.approx(4 * 10.24 + 2.0)  # the calibration, not the baseline
    one_drop = dict(dense, keep=[1.0, 0.5, 0.5, 0.5])
    three_drops = dict(dense, keep=[1.0, 0.75, 0.625, 0.5])
    assert space.predict_ms(one_drop, ctx) == pytest.approx(10.24 + 3 * 5.12 + 0.5 + 2.0)
    assert space.predict_ms(three_drops, ctx) == pytest.approx(10.24 + 7.68 + 6.40 + 5.12 + 3 * 0.5 + 2.0)


def test_calibrate_measures_the_reference_schedules_on_a_real_model(tmp_path):
    from policies.testing import tiny_llama
    from profilers.layer_profiler import profile_curves
    from search_spaces.token_retention import TokenRetentionState

    model = tiny_llama(layers=4)
    curves = profile_curves(model, "cpu", prefill_tokens=(16, 64, 128), decode_kv_tokens=(128,), warmup=1, repeats=2)
    ctx = SearchContext(model_fingerprint={"num_layers": 4}, workload={"prompt_tokens": 128, "new_tokens": 3},
                        device={}, curves=curves, artefacts=tmp_path, objective="ttft_ms")
    space = get_search_space("token_retention")
    state = ctx.prepared["token_retention"] = space.prepare(ctx, model, None, "cpu")
    assert isinstance(state, TokenRetentionState) and state.calibration is not None
    calibration = state.calibration
    assert [p["schedule"] for p in calibration.points] == ["dense", "light", "one_drop", "medium", "steep"]
    assert all(p["ttft_ms"] > 0 and p["decode_step_ms"] > 0 for p in calibration.points)
    saved = json.loads((tmp_path / "token_retention_calibration.json").read_text())
    assert saved["points"][0]["counts"] == [128] * 4 and set(saved["prefill"]) == {"scale", "per_event_ms", "fixed_ms"}
    # The cost model predicts with exactly that calibration: dense = the prefill fit at dense, no drop points.
    dense = {"keep": [1.0] * 4, "scorer": "attention", "window": 8, "sinks": 4}
    from search_spaces.token_retention import _Curves

    want = calibration.prefill(_Curves(ctx).prefill_ms([128] * 4), 0)
    assert space.predict_ms(dense, ctx) == pytest.approx(want)


def test_linear_cost_fit_around_a_measured_per_event_cost():
    from search_spaces.token_retention import LinearCost

    truth = LinearCost(scale=1.1, per_event_ms=0.7, fixed_ms=4.0)
    points = [(layers, events, truth(layers, events)) for layers, events in ((100.0, 0), (97.0, 5), (58.0, 1),
                                                                             (45.0, 5), (30.0, 5))]
    fit = LinearCost.fit(points, per_event=0.7)
    assert (fit.scale, fit.per_event_ms, fit.fixed_ms) == pytest.approx((1.1, 0.7, 4.0))


def test_linear_cost_fit_per_event_and_fixed_at_scale_one():
    from search_spaces.token_retention import LinearCost

    decode = LinearCost.fit([(3.0, 0, 3.5), (2.9, 5, 3.9), (2.8, 5, 3.8)])
    assert decode.scale == 1.0 and decode.per_event_ms == pytest.approx(0.1) and decode.fixed_ms == pytest.approx(0.5)
    # rank-deficient (every point has the same event count): no per-event term is invented
    same = LinearCost.fit([(10.0, 2, 12.0), (5.0, 2, 7.5)])
    assert same.per_event_ms == 0.0 and same.scale == 1.0 and same.fixed_ms == pytest.approx(2.25)
    # noise making the events look like savings: one offset, no per-event term
    noisy = LinearCost.fit([(100.0, 0, 110.0), (100.0, 5, 100.0), (50.0, 5, 50.0)])
    assert noisy.per_event_ms == 0.0 and noisy.scale == 1.0


def test_linear_cost_fit_around_a_measured_per_event_cost_keeps_only_physical_scales():
    from search_spaces.token_retention import LinearCost

    # one disturbed reference (the second) would make the fit 1.4x layers minus a fixed cost: refused
    fit = LinearCost.fit([(110.0, 0, 117.6), (106.0, 5, 136.0), (45.0, 5, 50.7)], per_event=0.6)
    assert fit.scale == 1.0 and fit.per_event_ms == 0.6


def test_free_family_samples_a_few_runs_of_layers_on_a_deep_model():
    """One decay per layer up to 7 layers; on a 30-layer model six decays over equal runs of layers."""
    from search_spaces.token_retention import FREE_SEGMENTS, free_schedule

    assert free_schedule([0.5, 0.9, 0.8]) == [1.0, 0.5, 0.45, 0.36]
    deep = free_schedule([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 30)
    assert len(deep) == 30 and deep[:2] == [1.0, 0.9] and len(set(deep[1:])) == FREE_SEGMENTS
    assert all(a >= b for a, b in zip(deep, deep[1:], strict=False))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"token_retention.family": "free"})
    trial = study.ask()
    get_search_space("token_retention").suggest(trial, _ctx(30))
    assert sum(name.startswith("token_retention.free.") for name in trial.params) == FREE_SEGMENTS
