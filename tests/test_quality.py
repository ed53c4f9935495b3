"""Quality harness: dense reference computed once and cached; metrics move the right way."""

from __future__ import annotations

import pytest
import torch

from policies import apply_policy
from tests import toy_technique
from tuner.models import load_model
from tuner.quality import QualityConfig, QualityHarness, QualityReport, quality_drop

CONFIG = QualityConfig(tasks=("pattern",), examples_per_task=4, free_text_samples=2, free_text_chars=400)


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def _harness(tiny, tmp_path=None) -> QualityHarness:
    return QualityHarness(tiny.model, tiny.tokenizer, CONFIG, cache_dir=tmp_path, model_key="tiny")


def test_dense_scores_itself_perfectly(tiny):
    harness = _harness(tiny)
    ref = harness.reference()
    with apply_policy(tiny.model, None) as dense:
        report = harness.evaluate(dense.generate, dense)
    assert report.accuracy == ref.accuracy
    assert report.predictions == ref.predictions
    assert report.top1_agreement == 100.0
    assert report.mean_kl == pytest.approx(0.0, abs=1e-6)


def test_a_temperature_change_moves_kl_not_agreement(tiny):
    toy_technique.register()
    from policies.registry import get_runtime

    harness = _harness(tiny)
    harness.reference()  # dense, before the perturbation
    handle = get_runtime("norm_scale").apply(tiny.model, {"factor": 0.3})
    try:
        report = harness.evaluate(lambda ids, **kw: tiny.model.generate(ids, do_sample=False, **kw), tiny.model)
    finally:
        handle.remove()
    # Scaling the final norm scales the logits (a temperature): the distribution moves, the argmax does not.
    assert report.mean_kl > 0.01
    assert report.top1_agreement == 100.0


def test_reference_cache_round_trip(tiny, tmp_path):
    first = _harness(tiny, tmp_path).reference()
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".safetensors"]
    second_harness = _harness(tiny, tmp_path)
    second_harness.model = None  # the cached reference must not need the model
    second = second_harness.reference()
    assert second.summary() == first.summary() and second.predictions == first.predictions
    fresh = _harness(tiny)
    fresh.reference()
    assert all(torch.equal(a, b) for a, b in zip(second_harness._ref_logprobs, fresh._ref_logprobs, strict=True))


def test_quality_drop_direction():
    assert quality_drop("accuracy", 90.0, 85.0) == 5.0
    assert quality_drop("mean_kl", 0.0, 0.2) == 0.2
    with pytest.raises(ValueError, match="quality metric 'bleu'"):
        QualityReport(accuracy=1.0, task_accuracy={}).metric("bleu")


def test_accuracy_stops_as_soon_as_the_floor_is_out_of_reach(tiny):
    harness = _harness(tiny)
    assert harness.reference().accuracy == 100.0  # builtin:tiny gets the 4 pattern examples right
    calls = []

    def wrong(input_ids, max_new_tokens, **kwargs):  # answers every prompt with the same token: all wrong
        calls.append(1)
        return torch.cat([input_ids, torch.full((1, max_new_tokens), 5, dtype=input_ids.dtype)], dim=1)

    full = harness.evaluate(wrong)
    assert (full.accuracy, full.n_examples, full.stopped_early) == (0.0, 4, False)
    calls.clear()
    stopped = harness.evaluate(wrong, stop_below=60.0)  # after 2 wrong answers at most 50 points are possible
    assert stopped.stopped_early and len(calls) == stopped.n_examples == 2
    assert stopped.accuracy == 50.0 and stopped.top1_agreement is None
    assert stopped.estimated_accuracy == 25.0  # Laplace: (0 right + 1) / (2 scored + 2)
    assert full.estimated_accuracy is None and "estimated_accuracy" not in full.summary()
    with apply_policy(tiny.model, None) as dense:  # a variant that can still make it is scored in full
        kept = harness.evaluate(dense.generate, dense, stop_below=100.0)
    assert not kept.stopped_early and kept.accuracy == 100.0 and kept.n_examples == 4
    # a variant that misses only its third answer stops there, with a better estimate than one that missed both
    with apply_policy(tiny.model, None) as dense:
        def dense_then_wrong(input_ids, max_new_tokens, **kwargs):
            calls.append(1)
            if len(calls) <= 2:
                return dense.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
            return wrong(input_ids, max_new_tokens)

        calls.clear()
        late = harness.evaluate(dense_then_wrong, stop_below=80.0)
    assert late.stopped_early and late.n_examples == 3 and late.accuracy == 75.0
    assert late.estimated_accuracy == 60.0 > stopped.estimated_accuracy  # (2 + 1) / (3 + 2)


def test_wilson_interval_matches_the_textbook_values_and_refuses_no_examples():
    from tuner.quality import wilson_interval

    lo, hi = wilson_interval(85, 100)  # 85/100: 76.7-90.7 (Wilson 1927; e.g. Newcombe 1998's method 3)
    assert round(lo, 1) == 76.7 and round(hi, 1) == 90.7
    lo, hi = wilson_interval(40, 40)  # all right: the interval is not degenerate
    assert hi == 100.0 and round(lo, 1) == 91.2
    assert wilson_interval(0, 10)[0] == 0.0
    with pytest.raises(ValueError, match="at least one example"):
        wilson_interval(0, 0)
