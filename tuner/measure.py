"""Measuring generation the way a user experiences it: time to first token, end-to-end latency, tokens/s.

Technique-agnostic on purpose: every variant (dense, a policy, a preset) is driven through the same
`generate(input_ids, max_new_tokens=..., min_new_tokens=...)` callable, so a technique that owns its decode
loop is timed exactly like one that only hooks the model. TTFT is the time of a generate call producing one
token (prefill + first token); latency is the call producing all `new_tokens` (EOS suppressed so every
variant generates the same count); decode tokens/s = (new_tokens - 1) / (latency - TTFT). Peak memory is
read in one more, untimed, full call (`peak_memory_of`): on CPU its tracker costs Python work per op.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from profilers.hf_compat import output_cache
from profilers.peak_memory import PeakMemory, cache_nbytes
from profilers.timing import synchronize

GenerateFn = Callable[..., torch.Tensor]


@dataclass
class GenerationSample:
    ttft_ms: float
    latency_ms: float


@dataclass
class GenerationMeasurement:
    """Medians over repeats, with the raw samples kept for spread."""

    ttft_ms: float
    latency_ms: float
    tokens_per_s: float
    peak_memory_mb: float | None
    memory_kind: str
    new_tokens: int
    samples: list[GenerationSample] = field(default_factory=list)
    kv_cache_mb: float | None = None


def time_generate(generate: GenerateFn, input_ids: torch.Tensor, n: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        generate(input_ids, max_new_tokens=n, min_new_tokens=n)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure_once(generate: GenerateFn, input_ids: torch.Tensor, new_tokens: int,
                 device: torch.device) -> GenerationSample:
    """One TTFT call and one full call."""
    ttft = time_generate(generate, input_ids, 1, device)
    latency = time_generate(generate, input_ids, new_tokens, device)
    return GenerationSample(ttft, latency)


@dataclass(frozen=True)
class MemoryReading:
    peak_mb: float | None
    kind: str


def peak_memory_of(generate: GenerateFn, input_ids: torch.Tensor, new_tokens: int,
                   device: torch.device) -> MemoryReading:
    """Peak extra memory of one full generate call (`profilers.peak_memory`); never timed."""
    with PeakMemory(device) as mem:
        time_generate(generate, input_ids, new_tokens, device)
    return MemoryReading(mem.peak_mb, mem.kind)


def summarize(samples: list[GenerationSample], new_tokens: int, memory: MemoryReading) -> GenerationMeasurement:
    """Median TTFT and latency; tokens/s from the medians; the peak memory of the untimed call."""
    ttft = statistics.median(s.ttft_ms for s in samples)
    latency = statistics.median(s.latency_ms for s in samples)
    decode_ms = latency - ttft
    tokens_per_s = (new_tokens - 1) / (decode_ms / 1e3) if new_tokens > 1 and decode_ms > 0 else new_tokens / (
        latency / 1e3)
    return GenerationMeasurement(ttft_ms=ttft, latency_ms=latency, tokens_per_s=tokens_per_s,
                                 peak_memory_mb=memory.peak_mb, memory_kind=memory.kind,
                                 new_tokens=new_tokens, samples=samples)


#: A full call at least this long is its own warm-up: first-call costs (allocator, kernel caches) are tens of
#: milliseconds, lost in a call of seconds, while a real model's warm-up pair at 2k tokens costs 7-16 s a trial.
LONG_CALL_MS = 1000.0


def measure_generation(generate: GenerateFn, input_ids: torch.Tensor, new_tokens: int, device: torch.device,
                       warmup: int | str = 1, repeats: int = 5,
                       forward: Callable[..., object] | None = None, peak_memory: bool = True) -> GenerationMeasurement:
    """Warm up, then `repeats` measurements of one variant; medians. With `forward`, also the KV-cache size;
    without `peak_memory`, no extra call for the memory reading (`peak_memory_mb` None, kind "not_measured").

    `warmup="auto"`: the first measured pair is the warm-up when its full call is shorter than `LONG_CALL_MS`
    (then `repeats` more are measured), and counts as the first sample otherwise."""
    samples: list[GenerationSample] = []
    if warmup == "auto":
        first = measure_once(generate, input_ids, new_tokens, device)
        if first.latency_ms >= LONG_CALL_MS:
            samples.append(first)
    else:
        for _ in range(int(warmup)):  # both call shapes, so that neither pays first-call costs when timed
            time_generate(generate, input_ids, 1, device)
            time_generate(generate, input_ids, new_tokens, device)
    samples += [measure_once(generate, input_ids, new_tokens, device) for _ in range(repeats - len(samples))]
    memory = peak_memory_of(generate, input_ids, new_tokens, device) if peak_memory else MemoryReading(
        None, "not_measured")
    result = summarize(samples, new_tokens, memory)
    if forward is not None:
        result.kv_cache_mb = prefill_kv_cache_mb(forward, input_ids)
    return result


def prefill_kv_cache_mb(forward: Callable[..., object], input_ids: torch.Tensor) -> float | None:
    """KV-cache size after prefilling `input_ids` through `forward` (a model or a policy handle), in MiB.

    Measured on the cache object itself, so techniques that keep fewer tokens in some layers show it."""
    with torch.inference_mode():
        out = forward(input_ids, use_cache=True)
    cache = output_cache(out)
    return None if cache is None else cache_nbytes(cache) / 2**20


def forwards_per_token(handle: Any) -> float | None:
    """Model forwards per generated token of the handle's last generate call, when its decode loop counts them
    (masked-diffusion decoding); None otherwise."""
    stats = handle.last_stats
    value = None if stats is None else stats.to_dict().get("forwards_per_token")
    return None if value is None else round(float(value), 4)
