"""Latency of one tree forward against the number of tree tokens, on this device: the verify curve.

Speculative decoding trades forwards for tokens: a step costs one target forward over the tree (plus the
drafter's forwards) and yields its accepted path plus one token. Whether 8 or 64 tree tokens pay depends on
how the forward's latency grows with the number of query tokens on *this* device: flat where the forward is
bound by weight reads or launch overhead (a GPU, or a tiny model on a CPU), steep where it is compute bound
(a CPU running a big model). Sequoia (Chen et al. 2024) makes the same point: the best tree is a property of
the hardware. This module measures `latency(n_query_tokens, n_kv_tokens)` for a causal LM with a KV cache of
`n_kv` tokens and a tree mask, including the cache compaction that follows each verify step.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from policies.tree_attention import compact_cache, tree_attention_mask, tree_position_ids
from profilers.hf_compat import cache_arg, new_dynamic_cache
from profilers.timing import synchronize

DEFAULT_QUERY_TOKENS = (1, 2, 4, 8, 16, 32, 64)
#: A point whose first timed forward takes this long is timed `LONG_FORWARD_REPEATS` times, not `repeats`: a
#: real model's forward on a 2-core CPU (SmolLM2: 85-375 ms) varies by a few percent, and its full grid at 7
#: repeats and two sweeps took 100 s of a 10-minute demo.
LONG_FORWARD_MS = 50.0
LONG_FORWARD_REPEATS = 3


def profile_verify(lm: Any, device: torch.device, n_kv: Sequence[int], n_query: Sequence[int] = DEFAULT_QUERY_TOKENS,
                   warmup: int = 2, repeats: int = 7, vocab_size: int | None = None,
                   passes: int = 2) -> list[dict[str, Any]]:
    """Rows {n_query, n_kv, ms}: time of a forward over `n_query` chain-masked tokens after `n_kv` cached
    tokens, followed by compacting the cache back (what one verify step does).

    Robust to a busy machine, because a disturbed curve picks the wrong trees: the grid is measured in
    `passes` separate sweeps, each point keeps the lowest of its per-sweep medians (interference only ever
    adds time), and the curve is then made non-decreasing in `n_query` from the right (a forward over more
    tokens is never faster, so a bump above a later point is noise)."""
    vocab = vocab_size or lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    best: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        caches = {}
        for kv in n_kv:
            caches[int(kv)] = new_dynamic_cache(lm.config)
            prefix = torch.randint(0, vocab, (1, int(kv)), generator=gen).to(device)
            lm(prefix, **cache_arg(lm, caches[int(kv)]), use_cache=True)
        for _ in range(max(1, passes)):
            for kv, cache in caches.items():
                for q in n_query:
                    ms = _median_forward_ms(lm, cache, kv, int(q), vocab, gen, device, warmup, repeats)
                    best[(kv, int(q))] = min(ms, best.get((kv, int(q)), float("inf")))
    rows = []
    for kv in caches:
        floor = float("inf")
        for q in sorted((int(q) for q in n_query), reverse=True):
            floor = min(floor, best[(kv, q)])
            rows.append({"n_query": q, "n_kv": kv, "ms": floor})
    return sorted(rows, key=lambda r: (r["n_kv"], r["n_query"]))


def _median_forward_ms(lm: Any, cache: Any, kv: int, q: int, vocab: int, gen: torch.Generator,
                       device: torch.device, warmup: int, repeats: int) -> float:
    import time

    parents = list(range(-1, q - 1))
    ids = torch.randint(0, vocab, (1, q), generator=gen).to(device)
    mask = tree_attention_mask(parents, kv, device=device)
    positions = tree_position_ids(parents, kv, device=device)
    times: list[float] = []
    for r in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        lm(ids, **cache_arg(lm, cache), use_cache=True, attention_mask=mask, position_ids=positions)
        compact_cache(cache, kv, [])
        synchronize(device)
        if r >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= LONG_FORWARD_REPEATS and times[0] >= LONG_FORWARD_MS:
            break
    return statistics.median(times)


class VerifyCurve:
    """Interpolates a `profile_verify` table: linear in n_query between measured sizes, linear in n_kv,
    clamped at the ends (a tree larger than the largest measured size extrapolates the last slope)."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            raise ValueError("an empty verify profile")
        self.kv = sorted({int(r["n_kv"]) for r in rows})
        self.table: dict[int, list[tuple[int, float]]] = {
            kv: sorted((int(r["n_query"]), float(r["ms"])) for r in rows if int(r["n_kv"]) == kv) for kv in self.kv
        }

    @staticmethod
    def _along(points: list[tuple[int, float]], q: float) -> float:
        if len(points) == 1:
            return points[0][1]
        for (q0, t0), (q1, t1) in zip(points, points[1:], strict=False):
            if q <= q1:
                return t0 + (t1 - t0) * (max(q, q0) - q0) / (q1 - q0) if q >= q0 else t0
        (q0, t0), (q1, t1) = points[-2], points[-1]
        return t1 + (t1 - t0) * (q - q1) / (q1 - q0)

    def ms(self, n_query: float, n_kv: float) -> float:
        if len(self.kv) == 1 or n_kv <= self.kv[0]:
            return self._along(self.table[self.kv[0]], n_query)
        if n_kv >= self.kv[-1]:
            return self._along(self.table[self.kv[-1]], n_query)
        hi = next(k for k in self.kv if k >= n_kv)
        lo = max(k for k in self.kv if k <= n_kv)
        if hi == lo:
            return self._along(self.table[lo], n_query)
        w = (n_kv - lo) / (hi - lo)
        return (1 - w) * self._along(self.table[lo], n_query) + w * self._along(self.table[hi], n_query)
