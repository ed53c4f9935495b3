"""The sparsity cost model: kernel-profile interpolation, the per-token decode delta, the calibrated
overheads, and kernel choice that charges the sparse path its overhead."""

from __future__ import annotations

import pytest

from search_spaces.sparsity import choose_kernels
from search_spaces.sparsity_cost import (
    KernelTable,
    Overheads,
    active_groups,
    calibrate,
    decode_delta_us,
    predict_latency_ms,
)


def _profile() -> list[dict]:
    rows = []
    for group in ("qkv", "o", "gate_up", "down"):
        for s, sparse_us in ((0.0, 30.0), (0.5, 12.0), (0.9, 4.0)):
            rows.append({"layer": 0, "group": group, "sparsity": s, "kernel": "dense", "us": 10.0})
            rows.append({"layer": 0, "group": group, "sparsity": s, "kernel": "csr_mv", "us": sparse_us})
            rows.append({"layer": 0, "group": group, "sparsity": s, "kernel": "gather_mv", "us": sparse_us + 1})
    return rows


def _section(levels, thresholds, kernels=None) -> dict:
    section = {"method": "teal", "levels": [levels], "thresholds": [thresholds]}
    if kernels:
        section["kernels"] = [kernels]
    return section


def test_kernel_table_interpolates_linearly_and_clamps():
    table = KernelTable(_profile())
    assert table.us(0, "down", "csr_mv", 0.7) == pytest.approx(8.0)
    assert table.us(0, "down", "csr_mv", 0.95) == 4.0 and table.us(0, "down", "csr_mv", -1) == 30.0
    assert table.dense_us(0, "o") == 10.0
    assert table.fastest_sparse(0, "o", 0.5) == "csr_mv"
    with pytest.raises(KeyError):
        table.us(3, "down", "csr_mv", 0.5)


def test_decode_delta_counts_only_active_groups_with_their_kernel_and_overhead():
    table, over = KernelTable(_profile()), Overheads(mask_us=2.0, sparse_us=5.0, prefill_ms=0.1)
    # qkv inactive (threshold 0); o masked dense (+2); down csr at 0.7 (8 - 10 + 5 = +3); gate_up csr at 0.9 (-1)
    section = _section([0.0, 0.3, 0.9, 0.7], [0.0, 0.1, 0.4, 0.2], ["dense", "dense", "csr_mv", "csr_mv"])
    assert [g for _, g, _, _ in active_groups(section)] == ["o", "gate_up", "down"]
    assert decode_delta_us(section, table, over) == pytest.approx(2.0 + (4 - 10 + 5) + (8 - 10 + 5))
    baseline = {"ttft_ms": 5.0, "latency_ms": 35.0}
    latency = predict_latency_ms(section, table, over, baseline, new_tokens=11, objective="latency_ms")
    assert latency == pytest.approx(5.0 + 3 * 0.1 + 30.0 + 10 * 4.0 / 1e3)
    assert predict_latency_ms(section, table, over, baseline, 11, "ttft_ms") == pytest.approx(5.3)


def test_calibration_recovers_the_overheads_from_three_measured_runs():
    table = KernelTable(_profile())
    masked = _section([0.5] * 4, [0.1] * 4)
    sparse = _section([0.9] * 4, [0.2] * 4, ["csr_mv"] * 4)
    truth = Overheads(mask_us=3.0, sparse_us=7.0, prefill_ms=0.25)

    def measure(section):  # a device that follows the model exactly: ttft 5 ms, decode 1 ms/token when dense
        return (5.0 + truth.prefill_ms * len(active_groups(section)),
                1.0 + decode_delta_us(section, table, truth) / 1e3)

    measured = {"dense": (5.0, 1.0), "masked": measure(masked), "sparse": measure(sparse)}
    got = calibrate(measured, masked, sparse, table)
    assert got.mask_us == pytest.approx(3.0) and got.sparse_us == pytest.approx(7.0)
    assert got.prefill_ms == pytest.approx(0.25)


def test_kernel_choice_charges_the_sparse_path_its_extra_overhead():
    levels = [[0.5, 0.5, 0.9, 0.0]]
    # 0.5: csr 12 us vs dense 10 us -> dense; 0.9: csr 4 us -> csr; level 0 -> dense
    assert choose_kernels(_profile(), levels) == [["dense", "dense", "csr_mv", "dense"]]
    # with a sparse path 7 us dearer than masking, 4 + 7 > 10: dense wins at 0.9 too
    assert choose_kernels(_profile(), levels, Overheads(1.0, 8.0, 0.0)) == [["dense"] * 4]
    assert choose_kernels(_profile(), levels, Overheads(1.0, 5.0, 0.0)) == [["dense", "dense", "csr_mv", "dense"]]
