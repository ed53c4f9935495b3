"""Timers that mean the same thing on every device.

GPU work is asynchronous: a ``perf_counter`` around a CUDA call measures the launch, not the kernel.
So on CUDA we time with CUDA events recorded on the current stream (no host sync inside the timed
region) and read them after one synchronisation; elsewhere we synchronise and use ``perf_counter``.
Every measurement is warm-up + repeats, and the median is the headline number because it is robust to
the odd preempted run on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TimingResult", "Timer", "as_torch_device", "synchronize", "time_callable"]


def as_torch_device(device: Any) -> torch.device:
    """Accept ``torch.device``, ``"cuda:0"``-style strings, or anything with a ``torch_spec``/``kind``
    (a ``DeviceFingerprint``) so callers can pass whatever they already hold."""
    if isinstance(device, torch.device):
        return device
    if device is None:
        return torch.device("cpu")
    spec = getattr(device, "torch_spec", None)
    if spec is not None:
        return torch.device(spec)
    return torch.device(str(device))


def synchronize(device: Any) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    dev = as_torch_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
    elif dev.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(dev)


@dataclass
class TimingResult:
    """Milliseconds per call: ``median_ms`` is the number to report; samples kept for spread."""

    median_ms: float
    samples_ms: list[float] = field(default_factory=list)
    mean_ms: float = 0.0
    min_ms: float = 0.0

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> TimingResult:
        if not samples_ms:
            raise ValueError("no timing samples")
        s = [float(x) for x in samples_ms]
        return cls(median_ms=statistics.median(s), samples_ms=s, mean_ms=statistics.fmean(s), min_ms=min(s))


class Timer:
    """Start/stop timer for one device: CUDA events on GPU, ``perf_counter`` + sync elsewhere.

    ``stop()`` returns a *pending* handle; call :meth:`elapsed_ms` on it after :func:`synchronize` so
    that several intervals can be recorded without a host sync between them."""

    def __init__(self, device: Any) -> None:
        self.device = as_torch_device(device)
        self.cuda = self.device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        synchronize(self.device)
        return time.perf_counter()

    def stop(self, start: Any) -> tuple[Any, Any]:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return (start, ev)
        synchronize(self.device)
        return (start, time.perf_counter())

    @staticmethod
    def elapsed_ms(interval: tuple[Any, Any]) -> float:
        """Milliseconds of a ``(start, stop)`` pair; for CUDA the device must have been synchronised."""
        a, b = interval
        if isinstance(a, float):
            return (b - a) * 1e3
        return float(a.elapsed_time(b))


def time_callable(fn: Callable[[], Any], device: Any, warmup: int = 3, repeats: int = 10) -> TimingResult:
    """Median wall time of ``fn()`` on ``device`` over ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timer = Timer(device)
    for _ in range(max(0, warmup)):
        fn()
    synchronize(timer.device)
    intervals = []
    for _ in range(repeats):
        t0 = timer.start()
        fn()
        intervals.append(timer.stop(t0))
    synchronize(timer.device)
    return TimingResult.from_samples([Timer.elapsed_ms(iv) for iv in intervals])
