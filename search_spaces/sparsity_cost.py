"""Cost model of activation sparsity: the decode latency of a `sparsity` section on this device.

Per token, each sparsified (layer, group) replaces the group's dense GEMV by either the masked dense GEMV
(kernel `dense`: the same work plus masking) or a sparse kernel (reads only the kept rows, plus the index
selection). So

    latency(section) = dense latency + prefill delta + (new tokens - 1) * sum over active groups of
                       [kernel_us(group, level) - dense_us(group) + overhead_us(kind)]

`kernel_us` comes from the device's kernel profile (`search_spaces.sparsity_profiler`, interpolated in sparsity).
The per-group overheads (hook dispatch, masking, index selection: what no kernel profile sees) are calibrated
once per study from three real decodes of the model on this device (`calibrate`): dense, every group masked
with the dense kernel, and every group on its fastest sparse kernel at a high level. On `builtin:tiny` the
overhead is most of the story (masking costs more than every GEMV it could save); on larger matrices the
kernel term dominates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from policies.sparsity import GROUPS


class KernelTable:
    """Profiled microseconds of one group's product, per (layer, group, kernel), interpolated in sparsity."""

    def __init__(self, profile: Sequence[dict[str, Any]]):
        self.points: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
        for r in profile:
            self.points.setdefault((int(r["layer"]), r["group"], r["kernel"]), []).append(
                (float(r["sparsity"]), float(r["us"])))
        for pts in self.points.values():
            pts.sort()

    def us(self, layer: int, group: str, kernel: str, sparsity: float) -> float:
        pts = self.points.get((layer, group, kernel))
        if not pts:
            raise KeyError(f"no profile for layer {layer} {group} {kernel}")
        if sparsity <= pts[0][0]:
            return pts[0][1]
        for (s0, u0), (s1, u1) in zip(pts, pts[1:], strict=False):
            if sparsity <= s1:
                return u0 + (u1 - u0) * (sparsity - s0) / (s1 - s0)
        return pts[-1][1]

    def dense_us(self, layer: int, group: str) -> float:
        return self.us(layer, group, "dense", 0.0)

    def fastest_sparse(self, layer: int, group: str, sparsity: float) -> str:
        kernels = {k for (lay, g, k) in self.points if lay == layer and g == group and k != "dense"}
        return min(sorted(kernels), key=lambda k: self.us(layer, group, k, sparsity))


@dataclass(frozen=True)
class Overheads:
    """Per active group: extra decode microseconds per token (masked dense / sparse kernel) and extra
    prefill milliseconds, beyond what the kernel profile accounts for."""

    mask_us: float
    sparse_us: float
    prefill_ms: float


def active_groups(section: dict[str, Any]) -> list[tuple[int, str, float, str]]:
    """(layer, group, level, kernel) of every group the section sparsifies (threshold > 0)."""
    kernels = section.get("kernels") or [["dense"] * len(GROUPS)] * len(section["levels"])
    out = []
    for layer, (levels, thresholds, names) in enumerate(zip(section["levels"], section["thresholds"], kernels,
                                                            strict=True)):
        for group, level, threshold, kernel in zip(GROUPS, levels, thresholds, names, strict=True):
            if threshold > 0:
                out.append((layer, group, float(level), kernel))
    return out


def decode_delta_us(section: dict[str, Any], table: KernelTable, overheads: Overheads) -> float:
    """Predicted change of the per-token decode time (microseconds) from dense."""
    total = 0.0
    for layer, group, level, kernel in active_groups(section):
        extra = overheads.mask_us if kernel == "dense" else overheads.sparse_us
        total += table.us(layer, group, kernel, level) - table.dense_us(layer, group) + extra
    return total


def predict_latency_ms(section: dict[str, Any], table: KernelTable, overheads: Overheads, baseline: dict[str, float],
                       new_tokens: int, objective: str) -> float:
    """Predicted `objective` (ttft_ms or latency_ms) of generating the workload with `section`."""
    prefill = float(baseline["ttft_ms"]) + overheads.prefill_ms * len(active_groups(section))
    if objective == "ttft_ms":
        return prefill
    dense_decode = float(baseline["latency_ms"]) - float(baseline["ttft_ms"])
    return prefill + dense_decode + (new_tokens - 1) * decode_delta_us(section, table, overheads) / 1e3


def calibrate(measured: dict[str, tuple[float, float]], masked: dict[str, Any], sparse: dict[str, Any],
              table: KernelTable) -> Overheads:
    """Overheads from three measured runs: `measured[name]` = (ttft ms, decode ms per token) for `dense`,
    `masked` (every group sparsified with the dense kernel: the `masked` section) and `sparse` (every group
    on a sparse kernel: the `sparse` section)."""
    ttft0, dec0 = measured["dense"]
    ttft1, dec1 = measured["masked"]
    ttft2, dec2 = measured["sparse"]
    n1, n2 = len(active_groups(masked)), len(active_groups(sparse))
    kernel_delta = sum(table.us(layer, g, k, lv) - table.dense_us(layer, g)
                       for layer, g, lv, k in active_groups(sparse))
    return Overheads(mask_us=max(0.0, (dec1 - dec0) * 1e3 / n1),
                     sparse_us=max(0.0, ((dec2 - dec0) * 1e3 - kernel_delta) / n2),
                     prefill_ms=max(0.0, (ttft1 - ttft0) / n1))
