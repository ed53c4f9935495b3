"""Latency of each projection group's batch-1 product against input sparsity, per kernel, on this device.

Whether skipping zeroed input channels pays is a property of the device and the matrix shape (a dense GEMV
of a small matrix is launch/overhead bound, a large one bandwidth bound), so the sparsity technique reads
its break-even points from this profile instead of assuming them. Layers of one model share their group
shapes, so each distinct (group, shape) is measured once and reported for every layer that has it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from policies.sparse_kernels import SPARSE_KERNELS, magnitude_keep
from policies.sparsity import group_linears

DEFAULT_SPARSITIES = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


def median_us(repeats: int, fn: Any, *args: Any) -> float:
    """Median wall time of `fn(*args)` in microseconds, after 5 warm-up calls."""
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def profile_sparse_kernels(model: Any, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                           repeats: int = 50) -> list[dict[str, Any]]:
    """Rows {layer, group, out_features, in_features, sparsity, kernel, us}: one batch-1 product of the group's
    concatenated weights (the group's linears read one input) with the dense GEMV and each sparse kernel."""
    measured: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for layer, groups in enumerate(group_linears(model)):
            for group, lins in groups.items():
                weight = torch.cat([lin.weight.detach().float() for lin in lins], dim=0)
                key = (group, weight.shape[0], weight.shape[1])
                if key not in measured:
                    measured[key] = _measure(weight, sparsities, repeats, gen)
                rows += [{"layer": layer, "group": group, **r} for r in measured[key]]
    return rows


def _measure(weight: torch.Tensor, sparsities: Sequence[float], repeats: int,
             gen: torch.Generator) -> list[dict[str, Any]]:
    out_features, in_features = weight.shape
    weight_t = weight.t().contiguous()
    x = torch.randn(in_features, generator=gen).to(weight.device)
    dense = median_us(repeats, F.linear, x, weight)
    rows = []
    for s in sparsities:
        keep = magnitude_keep(x, float(x.abs().quantile(s)) if s > 0 else -1.0)
        for kernel, fn in (("dense", None), *SPARSE_KERNELS.items()):
            us = dense if fn is None else median_us(repeats, fn, x, weight_t, keep)
            rows.append({"out_features": out_features, "in_features": in_features, "sparsity": s,
                         "kernel": kernel, "us": us})
    return rows


def break_even(rows: Sequence[dict[str, Any]], group: str) -> float | None:
    """Lowest measured sparsity at which some sparse kernel beats dense for `group` (None: never)."""
    by_s: dict[float, dict[str, float]] = {}
    for r in rows:
        if r["group"] == group:
            by_s.setdefault(r["sparsity"], {})[r["kernel"]] = r["us"]
    for s in sorted(by_s):
        kernels = by_s[s]
        if min(v for k, v in kernels.items() if k != "dense") < kernels["dense"]:
            return s
    return None
