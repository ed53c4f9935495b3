"""Peak memory of a block of code: what the tensors created inside it occupy at their worst.

- CUDA: the caching allocator's peak allocated bytes during the block, minus what was allocated before it
  (``cuda_peak_allocated``); free to read, so it can wrap a timed call.
- CPU: torch keeps no allocator counter there, and the process's resident set is useless after the first
  call (glibc reuses freed pages, so RSS growth reads 0 MB for every variant but the first). Instead a
  ``TorchDispatchMode`` sees every ATen op: each output whose storage is not one of the op's inputs' (a fresh
  allocation, not a view or an in-place result) adds its bytes to a live total, and a finalizer on the storage
  subtracts them when it is freed. The peak of that total is the block's peak extra tensor memory
  (``cpu_peak_tensors``): activations, KV caches, logits, scratch copies -- what a technique changes.
  Memory an op uses internally and frees before returning (a fused kernel's workspace) is not seen. The
  mode costs Python work per op, so the block must not be one that is also timed.
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
    """Counts the bytes of storages allocated by ops while active, and their peak; frees are seen through
    finalizers, which may run after the mode has exited (the totals then no longer matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()  # data pointers of storages counted and not yet freed

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {st.data_ptr() for st in map(_storage, tree_leaves((args, kwargs))) if st is not None}
        for st in map(_storage, tree_leaves(out)):
            if st is None:
                continue
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if ptr in inputs or ptr in self._tracked or nbytes == 0:
                continue
            self._tracked.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._freed, ptr, nbytes)
        return out

    def _freed(self, ptr: int, nbytes: int) -> None:
        self._tracked.discard(ptr)
        self.live -= nbytes


class PeakMemory:
    """Context manager measuring the peak extra memory (MiB) the block allocates on `device`.

    `kind` says what was measured: "cuda_peak_allocated" or "cpu_peak_tensors" (see the module docstring).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.kind = "cuda_peak_allocated" if self.device.type == "cuda" else "cpu_peak_tensors"
        self._start = 0
        self._mode: _LiveTensorBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
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
