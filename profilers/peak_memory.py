"""Peak memory of a block of code: what the tensors created inside it occupy at their worst.

- CUDA: the caching allocator's peak allocated bytes during the block, minus what was allocated before it
  (``cuda_peak_allocated``); free to read, so it can wrap a timed call.
- CPU: torch keeps no allocator counter there, and the process's resident set is useless after the first
  call (glibc reuses freed pages, so RSS growth reads 0 MB for every variant but the first). Instead a
  ``TorchDispatchMode`` sees every ATen op: an output storage that is new (not a view or an in-place result of
  an input) adds its bytes to a live total, one an op grew in place adds the growth, and a finalizer on the
  storage subtracts what was counted for it when it is freed. The peak of that total is the block's peak
  extra tensor memory (``cpu_peak_tensors``): activations, KV caches, logits, scratch copies -- what a technique
  changes. Memory an op uses internally and frees before returning (a fused kernel's workspace) is not seen.
  The mode costs Python work per op, so the block must not be one that is also timed.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_MB = 2**20


def _storage(t: Any) -> Any:
    """The untyped storage of a strided tensor, or None (sparse and other storage-less layouts)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages allocated by ops while active, and their peak. A storage is known by
    identity (torch keeps one Python object per live storage), so an address reused after a free is a new
    storage; one that an op grows in place (``resize_``, ``out=``) adds its growth. Frees are seen through
    finalizers, which may run after the mode has exited (the totals then no longer matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: dict[int, int] = {}  # id(storage) -> bytes counted for it, until it is freed

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        before = {id(st): st.nbytes() for st in map(_storage, tree_leaves((args, kwargs))) if st is not None}
        out = func(*args, **(kwargs or {}))
        seen: set[int] = set()
        for st in map(_storage, tree_leaves(out)):
            if st is None or id(st) in seen:
                continue
            seen.add(id(st))
            key, nbytes = id(st), st.nbytes()
            # counted before (allocated inside the block): only growth; else what is new beyond the inputs'
            grown = nbytes - (self._counted[key] if key in self._counted else before.get(key, 0))
            if grown <= 0:
                continue
            if key not in self._counted:
                self._counted[key] = 0
                weakref.finalize(st, self._freed, key)
            self._counted[key] += grown
            self.live += grown
            self.peak = max(self.peak, self.live)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._counted.pop(key, 0)


class PeakMemory:
    """Context manager measuring the peak extra memory (MiB) the block allocates on `device`.

    `kind` says what was measured: "cuda_peak_allocated" or "cpu_peak_tensors" (see the module docstring);
    on any other device "unavailable", with `peak_mb` None.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.kind = {"cuda": "cuda_peak_allocated", "cpu": "cpu_peak_tensors"}.get(self.device.type, "unavailable")
        self._start = 0
        self._mode: _LiveTensorBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            self._mode = _LiveTensorBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / _MB
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_mb = self._mode.peak / _MB
            self._mode = None


def cache_nbytes(cache: object) -> int:
    """Bytes of keys + values held by a Hugging Face cache (`DynamicCache` and friends, per-layer lengths
    included): what benchmarks report as KV-cache size."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
