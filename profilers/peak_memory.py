"""Peak memory of a block of code: CUDA peak allocated on GPU, peak resident set size on CPU.

On CPU there is no allocator counter, so we use the kernel's high-water mark: writing "5" to
/proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0), and VmHWM after the block minus
RSS before it is the peak extra memory the block touched. Where that file is unavailable the reading is
None rather than a guess.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Context manager measuring the peak extra memory (MiB) used inside the block on `device`.

    `kind` says what was measured: "cuda_peak_allocated" or "cpu_peak_rss" (or "unavailable").
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.kind = "unavailable"
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_peak_allocated"
        else:
            try:
                _CLEAR_REFS.write_text("5")
                self._start = _status_kib("VmRSS") or 0
                self.kind = "cpu_peak_rss"
            except OSError:
                self.kind = "unavailable"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self.kind == "cpu_peak_rss":
            hwm = _status_kib("VmHWM")
            self.peak_mb = None if hwm is None else max(hwm - self._start, 0) / 1024


def cache_nbytes(cache: object) -> int:
    """Bytes of keys + values held by a Hugging Face cache (`DynamicCache` and friends, per-layer lengths
    included): what benchmarks report as KV-cache size."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
