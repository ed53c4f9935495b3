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
from profilers.timing import synchronize

DEFAULT_QUERY_TOKENS = (1, 2, 4, 8, 16, 32, 64)


def profile_verify(lm: Any, device: torch.device, n_kv: Sequence[int], n_query: Sequence[int] = DEFAULT_QUERY_TOKENS,
                   warmup: int = 2, repeats: int = 7, vocab_size: int | None = None) -> list[dict[str, Any]]:
    """Rows {n_query, n_kv, ms}: median time of a forward over `n_query` chain-masked tokens after `n_kv`
    cached tokens, followed by compacting the cache back (what one verify step does)."""
    import time

    from transformers import DynamicCache

    vocab = vocab_size or lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for kv in n_kv:
            cache = DynamicCache(config=lm.config)
            prefix = torch.randint(0, vocab, (1, int(kv)), generator=gen).to(device)
            lm(prefix, past_key_values=cache, use_cache=True)
            for q in n_query:
                parents = list(range(-1, int(q) - 1))
                ids = torch.randint(0, vocab, (1, int(q)), generator=gen).to(device)
                mask = tree_attention_mask(parents, int(kv), device=device)
                positions = tree_position_ids(parents, int(kv), device=device)
                times = []
                for r in range(warmup + repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    lm(ids, past_key_values=cache, use_cache=True, attention_mask=mask, position_ids=positions)
                    compact_cache(cache, int(kv), [])
                    synchronize(device)
                    if r >= warmup:
                        times.append((time.perf_counter() - start) * 1e3)
                rows.append({"n_query": int(q), "n_kv": int(kv), "ms": statistics.median(times)})
    return rows


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
