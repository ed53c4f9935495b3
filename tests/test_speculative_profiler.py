"""The verify-latency profile: shape of the table, robustness to interference, interpolation."""

from __future__ import annotations

import pytest
import torch

from policies.testing import tiny_llama
from search_spaces import speculative_profiler
from search_spaces.speculative_profiler import VerifyCurve, profile_verify

# Talks to transformers internals (cache keyword, hooks, masks): CI also runs it on the oldest supported release.
pytestmark = pytest.mark.hf_internals


def test_profile_has_every_grid_point_and_is_non_decreasing_in_tree_size():
    rows = profile_verify(tiny_llama(), torch.device("cpu"), n_kv=(16, 32), n_query=(1, 2, 4), warmup=1, repeats=2)
    assert {(r["n_kv"], r["n_query"]) for r in rows} == {(kv, q) for kv in (16, 32) for q in (1, 2, 4)}
    for kv in (16, 32):
        ms = [r["ms"] for r in rows if r["n_kv"] == kv]
        assert all(a <= b for a, b in zip(ms, ms[1:], strict=False)) and all(m > 0 for m in ms)


def test_a_disturbed_measurement_does_not_survive(monkeypatch):
    """One sweep sees a 10x spike at 2 tokens; the lowest per-sweep median and the monotone floor remove it."""
    calls = {"n": 0}

    def fake(lm, cache, kv, q, vocab, gen, device, warmup, repeats):
        calls["n"] += 1
        spike = 10.0 if (q == 2 and calls["n"] <= 3) else 1.0
        return (1.0 + 0.1 * q) * spike

    monkeypatch.setattr(speculative_profiler, "_median_forward_ms", fake)
    rows = profile_verify(tiny_llama(), torch.device("cpu"), n_kv=(8,), n_query=(1, 2, 4), passes=2)
    assert [r["ms"] for r in rows] == pytest.approx([1.1, 1.2, 1.4])


def test_curve_interpolates_between_and_beyond_measured_sizes():
    curve = VerifyCurve([{"n_query": 1, "n_kv": 100, "ms": 1.0}, {"n_query": 5, "n_kv": 100, "ms": 2.0},
                         {"n_query": 1, "n_kv": 200, "ms": 2.0}, {"n_query": 5, "n_kv": 200, "ms": 4.0}])
    assert curve.ms(3, 100) == pytest.approx(1.5)
    assert curve.ms(3, 150) == pytest.approx(2.25)
    assert curve.ms(9, 100) == pytest.approx(3.0)  # the last slope, extrapolated
    assert curve.ms(1, 50) == pytest.approx(1.0)  # clamped in KV length
