"""`measure_generation`'s warm-up rules: which calls are timed and which samples are kept."""

from __future__ import annotations

import pytest
import torch

import tuner.measure as measure


def _fake_timer(monkeypatch: pytest.MonkeyPatch, full_ms: float) -> list[int]:
    """Replace the timed call: a 1-token call costs full_ms / 4, a full call full_ms; returns the calls' lengths."""
    calls: list[int] = []

    def fake(generate, input_ids, n, device):  # noqa: ANN001 - the signature of time_generate
        calls.append(n)
        return full_ms / 4 if n == 1 else full_ms + len(calls)  # distinct values: the median shows which were kept

    monkeypatch.setattr(measure, "time_generate", fake)
    return calls


def _measure(warmup: int | str, repeats: int = 3) -> measure.GenerationMeasurement:
    return measure.measure_generation(lambda *a, **k: None, torch.zeros(1, 4, dtype=torch.long), 8,
                                      torch.device("cpu"), warmup=warmup, repeats=repeats, peak_memory=False)


def test_auto_warmup_discards_a_short_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timer(monkeypatch, full_ms=100.0)
    result = _measure("auto")
    assert calls == [1, 8] * 4  # the first pair warms up, then three measured pairs
    assert len(result.samples) == 3
    assert result.latency_ms == 100.0 + 6  # the median of calls 4, 6 and 8: the warm-up's call 2 is not a sample


def test_auto_warmup_keeps_a_long_first_call_as_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timer(monkeypatch, full_ms=measure.LONG_CALL_MS * 5)
    result = _measure("auto")
    assert calls == [1, 8] * 3  # no separate warm-up: a call of seconds is its own
    assert [s.latency_ms for s in result.samples] == [measure.LONG_CALL_MS * 5 + k for k in (2, 4, 6)]


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_fixed_warmup_runs_that_many_pairs_first(monkeypatch: pytest.MonkeyPatch, warmup: int) -> None:
    calls = _fake_timer(monkeypatch, full_ms=measure.LONG_CALL_MS * 5)
    result = _measure(warmup, repeats=2)
    assert calls == [1, 8] * (warmup + 2)
    assert len(result.samples) == 2
