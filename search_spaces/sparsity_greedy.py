"""TEAL's greedy per-projection allocation of activation sparsity within each decoder layer.

Uniform sparsity treats a layer's four projection groups alike, but they differ a lot in how much a zeroed
channel hurts (on `builtin:tiny`, 80% on `down` keeps 88% top-1 agreement where 80% on `qkv` keeps 49%).
TEAL (Liu et al. 2024, section 4.2) allocates per projection greedily, block by block: starting dense, it
repeatedly raises the sparsity of the one projection whose increase grows the block's output error the
least per weight read it skips, and records the path.
Any target block sparsity then reads its allocation off the path, so the search costs nothing per trial.

Block sparsity here is weighted by parameters (the fraction of the block's weight reads skipped), which is
what the decode time follows. The error is the mean squared difference of the block's output from the
dense block's on calibration tokens, with the block run alone on its dense input (captured once). Group
thresholds are the quantiles of that dense input's scores; the policy's real thresholds are calibrated
afterwards in forward order (`calibrate_thresholds`), as for every other allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from policies.sparsity import GROUPS, SparsifiedInputs, channel_scores, column_norms, group_linears
from profilers.model_parts import decoder_parts

STEP = 0.05  # a candidate raises one group's sparsity by this much (TEAL's step)
MAX_GROUP_LEVEL = 0.95
MAX_BLOCK_LEVEL = 0.85
CALIBRATION_TOKENS = 512  # tokens the block is rerun on per candidate (the search's cost is linear in them)

Path = list[tuple[float, dict[str, float]]]  # (block sparsity, level per group) after each greedy step


def greedy_paths(model: nn.Module, batches: Sequence[torch.Tensor], method: str = "teal",
                 step: float = STEP, max_block_level: float = MAX_BLOCK_LEVEL,
                 max_tokens: int = CALIBRATION_TOKENS) -> list[Path]:
    """Per decoder layer, the greedy allocation path from dense to `max_block_level`, searched on the first
    `max_tokens` calibration tokens."""
    layers = decoder_parts(model).layers
    inputs = _capture_layer_inputs(model, layers, _first_tokens(batches, max_tokens))
    groups_per_layer = group_linears(model)
    paths = []
    for index, (layer, groups) in enumerate(zip(layers, groups_per_layer, strict=True)):
        params = {g: sum(lin.weight.numel() for lin in lins) for g, lins in groups.items()}
        norms = {g: column_norms(lins) for g, lins in groups.items()} if method == "wina" else {}
        with torch.inference_mode():
            dense_out, scores = _run_block(layer, inputs[index], groups, method, norms)
        paths.append(_greedy_layer(model, index, len(layers), layer, inputs[index], dense_out, scores, params,
                                   method, step, max_block_level))
    return paths


def levels_for(paths: Sequence[Path], target: float) -> list[list[float]]:
    """Per layer, the [qkv, o, gate_up, down] levels of the last path point at or below block sparsity
    `target` (the dense start when the first step already overshoots)."""
    rows = []
    for path in paths:
        levels = dict.fromkeys(GROUPS, 0.0)
        for block_level, point in path:
            if block_level > target + 1e-9:
                break
            levels = point
        rows.append([round(levels[g], 4) for g in GROUPS])
    return rows


def block_level(levels: dict[str, float], params: dict[str, int]) -> float:
    """The parameter-weighted sparsity of one block: the share of its weight reads skipped."""
    return sum(levels[g] * params[g] for g in params) / sum(params.values())


def _greedy_layer(model: nn.Module, index: int, n_layers: int, layer: nn.Module, layer_input: list[Any],
                  dense_out: list[torch.Tensor], scores: dict[str, torch.Tensor], params: dict[str, int],
                  method: str, step: float, max_block_level: float) -> Path:
    levels = dict.fromkeys(GROUPS, 0.0)
    path: Path = []
    while block_level(levels, params) < max_block_level - 1e-9:
        best: tuple[float, str, float] | None = None
        for group in GROUPS:
            new = min(MAX_GROUP_LEVEL, levels[group] + step)
            if new <= levels[group] + 1e-9:
                continue
            error = _block_error(model, index, n_layers, layer, layer_input, dense_out, scores,
                                 {**levels, group: new}, method)
            # Error per newly skipped weight read: the small `o` group skips few reads per step.
            cost = error / (new - levels[group]) / params[group]
            if best is None or cost < best[0]:
                best = (cost, group, new)
        if best is None:
            break
        levels = {**levels, best[1]: best[2]}
        path.append((block_level(levels, params), dict(levels)))
    return path


def _block_error(model: nn.Module, index: int, n_layers: int, layer: nn.Module, layer_input: list[Any],
                 dense_out: list[torch.Tensor], scores: dict[str, torch.Tensor], levels: dict[str, float],
                 method: str) -> float:
    thresholds: list[dict[str, float]] = [{} for _ in range(n_layers)]
    thresholds[index] = {g: _quantile(scores[g], lv) for g, lv in levels.items() if lv > 0}
    sparse = SparsifiedInputs(model, thresholds, method=method)
    try:
        with torch.inference_mode():
            error = sum(float(((_call(layer, call) - ref) ** 2).mean())
                        for call, ref in zip(layer_input, dense_out, strict=True))
    finally:
        sparse.remove()
    return error / len(layer_input)


def _quantile(sorted_scores: torch.Tensor, level: float) -> float:
    return float(sorted_scores[min(int(level * sorted_scores.numel()), sorted_scores.numel() - 1)])


def _first_tokens(batches: Sequence[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    out, left = [], max_tokens
    for ids in batches:
        if left <= 0:
            break
        out.append(ids[:, :left])
        left -= out[-1].shape[1]
    return out


def _call(layer: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def _run_block(layer: nn.Module, layer_input: list[Any], groups: dict[str, list[nn.Linear]], method: str,
               norms: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The dense block's outputs and each group's input scores (sorted, for the quantiles) on the captured
    inputs."""
    chunks: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    hooks = []
    for group, lins in groups.items():
        def record(module: nn.Module, args: tuple, group: str = group) -> None:
            chunks[group].append(channel_scores(args[0].detach().float(), method, norms.get(group)).flatten())
        hooks.append(lins[0].register_forward_pre_hook(record))
    try:
        outs = [_call(layer, call) for call in layer_input]
    finally:
        for h in hooks:
            h.remove()
    return outs, {group: torch.cat(parts).cpu().sort().values for group, parts in chunks.items()}


def _capture_layer_inputs(model: nn.Module, layers: Sequence[nn.Module],
                          batches: Sequence[torch.Tensor]) -> list[list[tuple[tuple, dict]]]:
    """Each layer's (args, kwargs) in a dense forward over every batch (no KV cache), to rerun it alone."""
    captured: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def grab(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            captured[i].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        hooks.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured
