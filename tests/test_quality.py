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
