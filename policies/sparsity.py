"""Training-free activation sparsity (TEAL, WINA): calibrate per-layer thresholds, zero small input channels.

Groundwork for the `sparsity` technique (issue 5): the calibration and masking halves, without the policy
section and search space yet.

Each decoder layer has four projection groups, each a set of linear layers that read the same input:
`qkv` (q/k/v projections: the normed hidden state), `o` (the attention output), `gate_up` (gate/up: the
normed hidden state after attention), `down` (the MLP's intermediate activation). Sparsifying a group's
input zeroes the channels whose score is below the group's threshold, per token:
- TEAL (Liu et al. 2024): score = |x_i|;
- WINA (Chen et al. 2025): score = |x_i| * ||W_{:,i}||, the column norm of the weights that channel feeds
  (for a group of several linears, the root of the summed squared column norms), so a small activation
  into heavy weights is kept and a larger one into negligible weights may go.
Thresholds are calibrated offline (`calibrate_thresholds`) as the per-group quantile of the score over
calibration tokens, so the expected fraction of zeroed channels equals the target level, and no statistics
are computed at inference time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from policies.config import Choice, Nullable, Number, Rows, TechniqueConfig, option, required
from policies.registry import FunctionHandle, TechniqueRuntime, register_runtime
from policies.schema import PolicyError
from policies.sparse_kernels import KERNELS
from profilers.model_parts import decoder_parts

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
METHODS = ("teal", "wina")
MAX_SAMPLES_PER_GROUP = 200_000  # scores kept per (layer, group) for the quantile; enough for 0.1-point precision


def group_linears(model: nn.Module) -> list[dict[str, list[nn.Linear]]]:
    """Per decoder layer, group name -> the linear layers reading that group's input."""
    out = []
    for i, layer in enumerate(decoder_parts(model).layers):
        groups = {}
        for name, paths in GROUPS.items():
            try:
                groups[name] = [layer.get_submodule(p) for p in paths]
            except AttributeError as exc:
                raise ValueError(f"activation sparsity: layer {i} has no {exc} (expected Llama-style "
                                 "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)") from None
        out.append(groups)
    return out


def column_norms(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """||W_{:,i}|| over all output rows of the group's linears (WINA's weight factor per input channel)."""
    return torch.sqrt(sum((lin.weight.detach().float() ** 2).sum(0) for lin in linears))


def channel_scores(x: torch.Tensor, method: str, norms: torch.Tensor | None) -> torch.Tensor:
    """Per-channel importance of activations `x` (..., in)."""
    if method == "teal":
        return x.abs()
    if method == "wina":
        return x.abs() * norms
    raise ValueError(f"unknown activation-sparsity method {method!r}; choose one of {', '.join(METHODS)}")


def calibrate_thresholds(model: nn.Module, batches: Sequence[torch.Tensor], levels: Sequence[dict[str, float]],
                         method: str = "teal", seed: int = 0) -> list[dict[str, float]]:
    """Per layer and group, the score threshold that zeroes a fraction `levels[i][group]` of that group's
    input channels on the calibration `batches` (token ids).

    Sequential, in forward order (layer by layer; qkv, o, gate_up, down within a layer): each group is
    calibrated with every earlier group already sparsified, because that is the input it will see at
    inference time. Calibrating all groups on the dense model instead drifts by several points downstream
    (measured on builtin:tiny: 3.4 points at layer 2's `o` for a 40% target). One forward pass does it all:
    the batches run as one batch and each group's threshold is set in flight, as its input arrives."""
    if method not in METHODS:
        raise ValueError(f"unknown activation-sparsity method {method!r}; choose one of {', '.join(METHODS)}")
    layers = group_linears(model)
    if len(levels) != len(layers):
        raise ValueError(f"levels: got {len(levels)} layers, the model has {len(layers)}")
    for i, row in enumerate(levels):
        for group, level in row.items():
            if group not in GROUPS:
                raise ValueError(f"levels[{i}].{group}: unknown group (known: {', '.join(GROUPS)})")
            if not 0 <= level < 1:
                raise ValueError(f"levels[{i}].{group}: must be in [0, 1), got {level}")
    if not batches:
        raise ValueError("calibrate_thresholds: no calibration batches")
    gen = torch.Generator().manual_seed(seed)
    ids, valid = _one_batch(batches)
    thresholds: list[dict[str, float]] = [{} for _ in layers]
    hooks = []
    for i, groups in enumerate(layers):
        for group in GROUPS:
            level = float(levels[i].get(group, 0.0))
            if level > 0:
                norms = column_norms(groups[group]) if method == "wina" else None
                hooks.append(groups[group][0].register_forward_pre_hook(
                    _calibrating_hook(thresholds[i], group, level, method, norms, gen, valid)))
                hooks += [lin.register_forward_pre_hook(_masking_hook(thresholds[i], group, method, norms))
                          for lin in groups[group][1:]]
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return thresholds


def _one_batch(batches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All calibration sequences as one right-padded (B, T) batch and its (B, T) mask of real tokens.

    One forward pass must see every token (that is what lets thresholds be set in flight). Right padding
    needs no attention mask under causal attention (a real token never sees a later pad), so every real
    token's activations equal those of its sequence run alone; the pads' are left out of the scores."""
    rows = [b.reshape(-1) for b in batches]
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=rows[0].dtype, device=rows[0].device)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for k, r in enumerate(rows):
        ids[k, : r.numel()], valid[k, : r.numel()] = r, True
    return ids, valid


def _calibrating_hook(layer_thresholds: dict[str, float], group: str, level: float, method: str,
                      norms: torch.Tensor | None, gen: torch.Generator, valid: torch.Tensor) -> Callable[..., tuple]:
    """Pre-hook of a group's first linear: set the group's threshold from the scores of the input it receives
    at real tokens (every earlier group is already sparsified by then: the pass runs in forward order), then
    mask it."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        scores = channel_scores(x[valid].detach().float(), method, norms).flatten().cpu()
        if scores.numel() > MAX_SAMPLES_PER_GROUP:
            scores = scores[torch.randint(0, scores.numel(), (MAX_SAMPLES_PER_GROUP,), generator=gen)]
        layer_thresholds[group] = float(torch.quantile(scores, level))
        return (x * (channel_scores(x, method, norms) > layer_thresholds[group]), *args[1:])

    return hook


def _masking_hook(layer_thresholds: dict[str, float], group: str, method: str,
                  norms: torch.Tensor | None) -> Callable[..., tuple]:
    """Pre-hook of a group's other linears: the same input, masked with the threshold just calibrated."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * (channel_scores(x, method, norms) > layer_thresholds[group]), *args[1:])

    return hook


class SparsifiedInputs:
    """Forward pre-hooks that zero each group's low-score input channels; `remove()` takes them off (the
    weights are never touched). With `track`, `observed_sparsity()` reports the fraction zeroed since the last
    reset."""

    def __init__(self, model: nn.Module, thresholds: Sequence[dict[str, float]], method: str = "teal",
                 track: bool = False) -> None:
        layers = group_linears(model)
        self.track = track  # count zeroed channels (a host sync per call: off at inference time)
        if len(thresholds) != len(layers):
            raise ValueError(f"thresholds: got {len(thresholds)} layers, the model has {len(layers)}")
        self.method = method
        self._zeroed: dict[tuple[int, str], list[int]] = {}
        self._handles = []
        self._caches: list[dict[str, torch.Tensor]] = []
        for i, (groups, layer_t) in enumerate(zip(layers, thresholds, strict=True)):
            for group, t in layer_t.items():
                if t <= 0:
                    continue  # level 0: the group runs dense, untouched
                lins = groups[group]
                norms = column_norms(lins).to(lins[0].weight.device) if method == "wina" else None
                # Every linear of the group reads the same input tensor; mask it once and reuse the result.
                cache: dict[str, torch.Tensor] = {}
                self._caches.append(cache)
                for k, lin in enumerate(lins):
                    self._handles.append(lin.register_forward_pre_hook(
                        self._masker(i, group, float(t), norms, cache, first=k == 0)))

    def _masker(self, layer: int, group: str, threshold: float, norms: torch.Tensor | None,
                cache: dict[str, torch.Tensor], first: bool) -> Callable[..., tuple]:
        counts = self._zeroed.setdefault((layer, group), [0, 0])

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if first or cache.get("source") is not x:
                keep = channel_scores(x, self.method, norms) > threshold
                cache["source"], cache["masked"] = x, x * keep
                if self.track:
                    counts[0] += int((~keep).sum())
                    counts[1] += keep.numel()
            return (cache["masked"], *args[1:])

        return hook

    def observed_sparsity(self) -> dict[tuple[int, str], float]:
        return {key: z / n for key, (z, n) in self._zeroed.items() if n}

    def reset_counts(self) -> None:
        for counts in self._zeroed.values():
            counts[0] = counts[1] = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for cache in self._caches:  # drop the last activations the hooks held on to
            cache.clear()


class SparseRowExecution:
    """Real sparse execution for single-row inputs (decode at batch 1): the chosen groups' linears skip the
    weight rows of zeroed input channels with a `policies.sparse_kernels` kernel, over the group's weights
    concatenated and stored transposed (W^T contiguous: one extra copy of those weights), computed once per
    input and split among the group's linears. Inputs of more than one row run the ordinary dense forward.

    Runs after `SparsifiedInputs`' masking hooks (forward pre-hooks run before `forward`), so the kept
    channels are exactly the nonzero ones. `remove()` restores every linear's own forward."""

    def __init__(self, model: nn.Module, kernels: Sequence[dict[str, str]]) -> None:
        layers = group_linears(model)
        if len(kernels) != len(layers):
            raise ValueError(f"kernels: got {len(kernels)} layers, the model has {len(layers)}")
        self._restore: list[Callable[[], None]] = []
        self.calls = 0
        for groups, layer_kernels in zip(layers, kernels, strict=True):
            for group, kernel in layer_kernels.items():
                if kernel not in KERNELS:
                    raise ValueError(f"unknown sparse kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
                if kernel != "dense":
                    self._install(groups[group], kernel)

    def _install(self, lins: list[nn.Linear], kernel: str) -> None:
        from policies.sparse_kernels import sparse_mv

        weight = torch.cat([lin.weight.detach() for lin in lins], dim=0)
        weight_t = weight.t().contiguous()
        biases = [lin.bias for lin in lins]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
             for b, lin in zip(biases, lins, strict=True)])
        splits = [lin.out_features for lin in lins]
        state: dict[str, Any] = {}

        for k, lin in enumerate(lins):
            own = lin.forward
            had_instance_forward = "forward" in lin.__dict__

            def forward(x: torch.Tensor, k: int = k, own: Callable[..., torch.Tensor] = own) -> torch.Tensor:
                if x.numel() != x.shape[-1]:
                    return own(x)
                if k == 0 or state.get("source") is not x:
                    row = x.reshape(-1)
                    keep = row.nonzero().squeeze(1)
                    y = sparse_mv(kernel, row, weight, weight_t, keep, bias)
                    state["source"], state["outs"] = x, y.split(splits)
                    self.calls += 1
                return state["outs"][k].reshape(*x.shape[:-1], -1)

            lin.forward = forward

            def restore(lin: nn.Linear = lin, own: Callable[..., torch.Tensor] = own,
                        had: bool = had_instance_forward) -> None:
                if had:
                    lin.forward = own
                else:
                    del lin.forward
                state.clear()

            self._restore.append(restore)

    def remove(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore = []


# -- policy section and runtime ----------------------------------------------------------------------------------
NAME = "sparsity"
SECTION_PATH = f"techniques.{NAME}"


@dataclass(frozen=True, kw_only=True)
class SparsityConfig(TechniqueConfig):
    """`techniques.sparsity`: per layer and projection group, a target sparsity and its calibrated threshold
    (the layer count is checked against the model at apply time)::

        method: teal | wina
        levels:     [[qkv, o, gate_up, down], ...]   # per layer: target fraction of zeroed channels, [0, 1)
        thresholds: [[qkv, o, gate_up, down], ...]   # per layer: the calibrated score thresholds (>= 0)
        kernels:    [[qkv, o, gate_up, down], ...]   # optional: dense | gather_mv | embedding_bag_mv | csr_mv
    """

    technique: ClassVar[str] = NAME
    description: ClassVar[str] = ("Training-free activation sparsity (TEAL / WINA): zero each projection group's "
                                  "low-score input channels, optionally skipping their weight rows.")

    method: str = option("teal", Choice(METHODS), "channel score: |x| (teal) or |x| x weight column norm (wina)")
    levels: tuple[tuple[float, ...], ...] = required(Rows(tuple(GROUPS), Number(ge=0, lt=1)),
                                                     "per layer: target fraction of zeroed input channels")
    thresholds: tuple[tuple[float, ...], ...] = required(Rows(tuple(GROUPS), Number(ge=0)),
                                                         "per layer: the calibrated score thresholds")
    kernels: tuple[tuple[str, ...], ...] | None = option(
        None, Nullable(Rows(tuple(GROUPS), Choice(KERNELS))), "per layer: the kernel that runs each group on one "
        "row (dense keeps the masked dense matmul)")

    def check(self, path: str) -> list[str]:
        problems = []
        if len(self.thresholds) != len(self.levels):
            problems.append(f"{path}.thresholds: {len(self.thresholds)} layers, but levels has {len(self.levels)}")
        if self.kernels is not None and len(self.kernels) != len(self.levels):
            problems.append(f"{path}.kernels: must be a list with one [{', '.join(GROUPS)}] row per layer, like "
                            "levels")
        return problems


class SparsityRuntime(TechniqueRuntime):
    """`techniques.sparsity`: zero each projection group's low-score input channels; groups given a sparse
    kernel in `kernels` also skip the zeroed channels' weight rows on single-row inputs."""

    name = NAME
    config_class = SparsityConfig
    order = 110  # forward hooks on the projections

    def apply(self, model: nn.Module, config: SparsityConfig | dict[str, Any]) -> FunctionHandle:
        config = self.config_of(config)
        n_layers = len(decoder_parts(model).layers)
        if len(config.thresholds) != n_layers:
            raise PolicyError(f"{SECTION_PATH}.thresholds: has {len(config.thresholds)} layers, the model "
                              f"has {n_layers}")
        thresholds = [dict(zip(GROUPS, row, strict=True)) for row in config.thresholds]
        hooks = SparsifiedInputs(model, thresholds, method=config.method)
        kernels = config.kernels
        if not kernels:
            return FunctionHandle(hooks.remove)
        execution = SparseRowExecution(model, [dict(zip(GROUPS, row, strict=True)) for row in kernels])

        def undo() -> None:
            execution.remove()
            hooks.remove()

        return FunctionHandle(undo)


register_runtime(SparsityRuntime())
