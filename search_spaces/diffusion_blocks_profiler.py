"""Latency of one denoiser forward on this device: the full sequence, and a window over a block KV cache.

A masked-diffusion decode is a sequence of forwards (`policies.diffusion_blocks`): the first forward of each block
runs over the whole sequence (prompt + canvas), the others over the whole sequence too (no cache) or over a
window of it against the kept keys/values of the rest (`prefix` / `dual` cache).  So the cost of a decoding
policy is the latency of those two forward shapes times how many of each it runs, and both shapes are
measured here on the real model, not guessed: how a window of 8 or 64 query tokens against a 1k-token cache
compares with a full 1k-token forward is exactly the device-dependent part (flat on a GPU, nearly linear on
a small CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from profilers.hf_compat import cache_arg
from profilers.timing import time_callable

DEFAULT_WINDOWS = (2, 4, 8, 16, 32, 64, 128)


def _ids(n: int, vocab: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, max(vocab - 1, 1), (1, n), generator=gen).to(device)


def profile_denoiser(model: Any, device: torch.device, seq_lens: Sequence[int], kv_tokens: int,
                     windows: Sequence[int] = DEFAULT_WINDOWS, cache: bool = True, warmup: int = 2,
                     repeats: int = 5) -> dict[str, list[dict[str, Any]]]:
    """``{"full": [{n_query, n_kv: 0, ms}], "window": [{n_query, n_kv, ms}]}``: median latency of a full forward
    per sequence length, and of a windowed forward of ``n_query`` tokens over ``kv_tokens`` kept keys/values
    (only when ``cache`` -- the model supports the block cache).  Random token ids: a forward's cost does not
    depend on the tokens."""
    from policies.diffusion_blocks import BlockKV

    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, list[dict[str, Any]]] = {"full": [], "window": []}
    with torch.inference_mode():
        for n in sorted({int(s) for s in seq_lens}):
            ids = _ids(n, vocab, gen, device)
            ms = time_callable(lambda ids=ids: model(ids), device, warmup=warmup, repeats=repeats).median_ms
            rows["full"].append({"n_query": n, "n_kv": 0, "ms": ms})
        if not cache:
            return rows
        for q in sorted({int(w) for w in windows}):
            ids = _ids(kv_tokens + q, vocab, gen, device)
            kv = BlockKV()
            model(ids, **cache_arg(model, kv))
            kv.keep_outside(kv_tokens, kv_tokens + q)
            part = ids[:, kv_tokens:]
            positions = torch.arange(kv_tokens, kv_tokens + q, device=device)[None]
            ms = time_callable(lambda part=part, kv=kv, positions=positions: model(
                part, **cache_arg(model, kv), position_ids=positions), device, warmup=warmup, repeats=repeats).median_ms
            rows["window"].append({"n_query": q, "n_kv": kv_tokens, "ms": ms})
    return rows
