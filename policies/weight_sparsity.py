"""Training-free unstructured and 2:4 weight sparsity (magnitude, Wanda) per layer and projection group.

The `weight_sparsity` technique zeroes a fraction of each projection's weights, chosen per decoder layer and per
projection group (the groups of `policies.sparsity`: `qkv`, `o`, `gate_up`, `down`):
- `magnitude`: the smallest |W_ij| of each linear's whole matrix go (layer-wise magnitude pruning);
- `wanda` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score = |W_ij| * ||X_j||_2,
  the weight times the L2 norm of its input channel over calibration tokens, compared *per output row*: every
  row loses the same fraction, its lowest-score entries (the paper found per-output comparison matters for LLMs).
- `structure: "2:4"`: in every 4 consecutive input weights of a row the 2 highest-score ones are kept, and the
  weight is stored with `torch.sparse.to_sparse_semi_structured`, which runs on sparse tensor cores (CUDA
  compute capability >= 8.0, fp16/bf16) and nowhere else; elsewhere the section is refused at apply time.

Wanda's input norms are calibrated offline (`input_norms`) and stored in the policy file, so inference needs no
calibration data. Unstructured sparsity here is a *quality* experiment: the weights stay dense tensors, so the
matmuls do the same work (2:4 is the only structure that is faster, and only where supported).

`apply` zeroes in place and keeps each touched linear's dense weight, so `remove()` puts the exact values
back (one loaded model serves a whole study). It runs before the activation-sparsity runtime, whose sparse
kernels copy the weights into a transposed cache at apply time and must see the pruned ones.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from policies.config import Choice, Nullable, Number, Rows, Spec, TechniqueConfig, option, required
from policies.registry import FunctionHandle, TechniqueRuntime, register_runtime
from policies.schema import PolicyError
from policies.sparsity import GROUPS, group_linears
from profilers.model_parts import decoder_parts

NAME = "weight_sparsity"
SECTION_PATH = f"techniques.{NAME}"
METHODS = ("magnitude", "wanda")
UNSTRUCTURED, TWO_FOUR = "unstructured", "2:4"
STRUCTURES = (UNSTRUCTURED, TWO_FOUR)
TWO_FOUR_LEVEL = 0.5  # 2 of every 4 weights zeroed
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# -- masks (pure functions; True = weight kept) ----------------------------------------------------------------
def pruned_count(level: float, n: int) -> int:
    """How many of `n` weights a `level` zeroes: floor, so a matrix is never sparser than asked (the epsilon
    keeps 0.3 * 10 from flooring to 2)."""
    return min(n, math.floor(level * n + 1e-9))


def _drop_lowest_per_row(scores: torch.Tensor, level: float) -> torch.Tensor:
    """Keep-mask of a 2-D `scores`: each row loses exactly its `pruned_count` lowest entries (top-k, not a
    threshold, so ties cannot change the count; about 3x faster than a full sort on CPU)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = pruned_count(level, scores.shape[-1])
    if k:
        keep.scatter_(-1, scores.topk(k, dim=-1, largest=False).indices, False)
    return keep


def magnitude_mask(weight: torch.Tensor, level: float) -> torch.Tensor:
    """Keep-mask zeroing the `level` fraction of smallest |W| over the whole matrix."""
    scores = weight.detach().abs().float().reshape(1, -1)
    return _drop_lowest_per_row(scores, level).view(weight.shape)


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: Wanda's importance of each weight (in float32, whatever the weight dtype)."""
    if input_norms.shape != (weight.shape[-1],):
        raise ValueError(f"input norms: got shape {tuple(input_norms.shape)}, the weight has {weight.shape[-1]} "
                         "input channels")
    return weight.detach().abs().float() * input_norms.detach().float().to(weight.device)


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, level: float) -> torch.Tensor:
    """Keep-mask zeroing, in each output row, the `level` fraction of lowest Wanda scores."""
    return _drop_lowest_per_row(wanda_scores(weight, input_norms), level)


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask of the 2 highest scores in every group of 4 consecutive entries of the last dimension (the
    2:4 pattern of sparse tensor cores)."""
    if scores.shape[-1] % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 input channels, got {scores.shape[-1]}")
    groups = scores.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view(scores.shape)


def keep_mask(weight: torch.Tensor, method: str, level: float, structure: str = UNSTRUCTURED,
              norms: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask of one linear's weight for a section's method, structure and level."""
    if method not in METHODS:
        raise ValueError(f"unknown weight-sparsity method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "wanda" and norms is None:
        raise ValueError("wanda needs the input norms of the linear's input channels")
    if structure == TWO_FOUR:
        scores = wanda_scores(weight, norms) if method == "wanda" else weight.detach().abs().float()
        return two_four_mask(scores)
    return wanda_mask(weight, norms, level) if method == "wanda" else magnitude_mask(weight, level)


# -- calibration: Wanda's input norms --------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the layer of interest has run."""


def input_norms(model: nn.Module, batches: Sequence[torch.Tensor], levels: Sequence[Sequence[float]] | None = None,
                structure: str = UNSTRUCTURED) -> list[dict[str, torch.Tensor]]:
    """Per layer and group, the L2 norm of each input channel over all tokens of the calibration `batches`
    (token ids), as float32 CPU vectors.

    Without `levels`: one pass over the dense model. With `levels` (rows of [qkv, o, gate_up, down]): layer by
    layer as the Wanda reference code does (after SparseGPT), each layer's norms measured with the earlier
    layers already Wanda-pruned at their levels, since that is the input the layer sees once pruned; the
    model's weights are restored before returning."""
    if not batches:
        raise ValueError("input_norms: no calibration batches")
    layers = group_linears(model)
    if levels is None:
        return _measure_norms(model, batches, layers, range(len(layers)))
    if len(levels) != len(layers):
        raise ValueError(f"levels: got {len(levels)} layers, the model has {len(layers)}")
    decoder_layers = decoder_parts(model).layers
    norms: list[dict[str, torch.Tensor]] = []
    undo: list[Callable[[], None]] = []
    try:
        for i, groups in enumerate(layers):
            norms += _measure_norms(model, batches, layers, [i], stop_at=decoder_layers[i])
            if i + 1 < len(layers):  # the last layer's pruning would change no later input
                row = dict(zip(GROUPS, levels[i], strict=True))
                undo += _prune_layer(groups, row, "wanda", structure, norms[i], zero_in_place)
    finally:
        _undo_all(undo)
    return norms


def _measure_norms(model: nn.Module, batches: Sequence[torch.Tensor], layers: list[dict[str, list[nn.Linear]]],
                   which: Sequence[int], stop_at: nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
    """Input-channel norms of the layers `which`, from forward pre-hooks on each group's first linear (every
    linear of a group reads the same input); `stop_at`'s forward ends the pass early."""
    sums = {(i, g): torch.zeros(layers[i][g][0].in_features, dtype=torch.float64) for i in which for g in GROUPS}

    def record(key: tuple[int, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            sums[key] += x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()
        return hook

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    handles = [layers[i][g][0].register_forward_pre_hook(record((i, g))) for i, g in sums]
    if stop_at is not None:
        handles.append(stop_at.register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for ids in batches:
                try:
                    model(ids)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return [{g: sums[(i, g)].sqrt().float() for g in GROUPS} for i in which]


# -- pruning and undo ------------------------------------------------------------------------------------------
def zero_in_place(lin: nn.Linear, keep: torch.Tensor) -> Callable[[], None]:
    """Zero `lin.weight` where `keep` is False; returns the undo, which copies back the dense weight kept
    here (exact: a bit copy, no arithmetic)."""
    with torch.no_grad():
        dense = lin.weight.detach().clone()
        lin.weight.masked_fill_(~keep.to(lin.weight.device), 0)

    def undo() -> None:
        with torch.no_grad():
            lin.weight.copy_(dense)

    return undo


def to_semi_structured(lin: nn.Linear, keep: torch.Tensor) -> Callable[[], None]:
    """Replace `lin.weight` by its 2:4-compressed masked copy; the undo puts the original Parameter back
    (never modified, so exact)."""
    original = lin.weight
    masked = original.detach().masked_fill(~keep.to(original.device), 0).contiguous()
    lin.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(masked), requires_grad=False)

    def undo() -> None:
        lin.weight = original

    return undo


def _prune_layer(groups: dict[str, list[nn.Linear]], levels: dict[str, float], method: str, structure: str,
                 norms: dict[str, torch.Tensor] | None,
                 prune: Callable[[nn.Linear, torch.Tensor], Callable[[], None]]) -> list[Callable[[], None]]:
    """Prune every linear of the groups with a nonzero level; returns the undos (level 0: untouched)."""
    undo = []
    for group, lins in groups.items():
        level = float(levels.get(group, 0.0))
        if level == 0:
            continue
        for lin in lins:
            mask = keep_mask(lin.weight, method, level, structure, norms[group] if norms else None)
            undo.append(prune(lin, mask))
    return undo


def _undo_all(undo: list[Callable[[], None]]) -> None:
    for restore in reversed(undo):
        restore()
    undo.clear()


# -- policy section --------------------------------------------------------------------------------------------
def encode_norms(norms: torch.Tensor) -> str:
    """Base64 of the little-endian float32 values (the section's `norms` entries)."""
    return base64.b64encode(norms.detach().float().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def decode_norms(text: str) -> torch.Tensor:
    """Inverse of `encode_norms`; ValueError saying what is wrong with `text`."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"must be a non-empty base64 string, got {text!r}"[:120])
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if not raw or len(raw) % 4:
        raise ValueError(f"decodes to {len(raw)} bytes, not a whole number of float32 values")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("norms must be finite and >= 0")
    return torch.from_numpy(values)


@dataclass(frozen=True)
class Base64Norms(Spec):
    """A base64 string of little-endian float32 input-channel norms (``encode_norms``)."""

    def problems(self, value: Any, path: str) -> list[str]:
        try:
            decode_norms(value)
        except ValueError as exc:
            return [f"{path}: {exc}"]
        return []

    def expected(self) -> str:
        return "a base64 string"

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "contentEncoding": "base64"}


@dataclass(frozen=True, kw_only=True)
class WeightSparsityConfig(TechniqueConfig):
    """`techniques.weight_sparsity`. The layer count and the norms' lengths are checked against the model at apply
    time, and so is 2:4's hardware, since a policy file is written for one device::

        method: magnitude | wanda
        structure: unstructured | "2:4"            # optional, default unstructured
        levels: [[qkv, o, gate_up, down], ...]     # per layer: fraction of weights zeroed, in [0, 1);
                                                   # with 2:4 optional, each 0 (group dense) or 0.5; omitted: all 0.5
        norms:  [[qkv, o, gate_up, down], ...]     # wanda only, required: per layer, base64 little-endian float32
                                                   # L2 norms of the group's input channels
    """

    technique: ClassVar[str] = NAME
    description: ClassVar[str] = ("Training-free weight sparsity per layer and projection group: magnitude or Wanda "
                                  "(|W| x input-channel norm, per output row), unstructured or 2:4 (CUDA sm80+, "
                                  "fp16/bf16).")

    method: str = required(Choice(METHODS), "weight score: |W| (magnitude) or |W| x input norm (wanda)")
    structure: str = option(UNSTRUCTURED, Choice(STRUCTURES), "unstructured, or 2 of every 4 weights (2:4)")
    levels: tuple[tuple[float, ...], ...] | None = option(
        None, Nullable(Rows(tuple(GROUPS), Number(ge=0, lt=1))), "per layer: fraction of weights zeroed; with 2:4 "
        "each 0 (group dense) or 0.5, omitted: all 0.5")
    norms: tuple[tuple[str, ...], ...] | None = option(
        None, Nullable(Rows(tuple(GROUPS), Base64Norms())), "wanda only: per layer, base64 little-endian float32 "
        "L2 norms of each group's input channels")

    def check(self, path: str) -> list[str]:
        problems = []
        if self.levels is None and self.structure != TWO_FOUR:
            problems.append(f"{path}.levels: required, a list with one [{', '.join(GROUPS)}] row per layer")
        if self.structure == TWO_FOUR:
            for i, row in enumerate(self.levels or ()):
                for group, value in zip(GROUPS, row, strict=True):
                    if value not in (0, TWO_FOUR_LEVEL):
                        problems.append(f"{path}.levels[{i}].{group}: must be 0 (dense) or 0.5 with structure 2:4, "
                                        f"got {value!r}")
        if self.method == "wanda" and self.norms is None:
            problems.append(f"{path}.norms: required for method wanda, a list with one [{', '.join(GROUPS)}] row of "
                            "base64 float32 vectors per layer")
        elif self.method != "wanda" and self.norms is not None:
            problems.append(f"{path}.norms: only method wanda uses input norms; remove it for method {self.method!r}")
        if self.levels is not None and self.norms is not None and len(self.levels) != len(self.norms):
            problems.append(f"{path}.norms: {len(self.norms)} layers, but levels has {len(self.levels)}")
        return problems


def _model_levels(config: WeightSparsityConfig, n_layers: int) -> list[dict[str, float]]:
    """Per layer, group -> level, checked against the model's layer count."""
    rows = config.levels
    if rows is None:  # 2:4 without levels: every group of every layer
        rows = [[TWO_FOUR_LEVEL] * len(GROUPS)] * n_layers
    if len(rows) != n_layers:
        raise PolicyError(f"{SECTION_PATH}.levels: has {len(rows)} layers, the model has {n_layers}")
    return [dict(zip(GROUPS, (float(v) for v in row), strict=True)) for row in rows]


def _model_norms(config: WeightSparsityConfig,
                 layers: list[dict[str, list[nn.Linear]]]) -> list[dict[str, torch.Tensor]]:
    """Decoded norms per layer and group, checked against the model's layer count and input widths."""
    rows = config.norms or ()
    if len(rows) != len(layers):
        raise PolicyError(f"{SECTION_PATH}.norms: has {len(rows)} layers, the model has {len(layers)}")
    out = []
    for i, (row, groups) in enumerate(zip(rows, layers, strict=True)):
        decoded = {}
        for group, text in zip(GROUPS, row, strict=True):
            vec, width = decode_norms(text), groups[group][0].in_features
            if vec.numel() != width:
                raise PolicyError(f"{SECTION_PATH}.norms[{i}].{group}: has {vec.numel()} channels, the model's "
                                  f"{group} input has {width}")
            decoded[group] = vec
        out.append(decoded)
    return out


def semi_structured_problem(weight: torch.Tensor) -> str | None:
    """Why `weight` cannot use 2:4 sparse tensor cores here (None when it can)."""
    if weight.device.type != "cuda":
        return f"this model is on {weight.device.type}"
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"this GPU has compute capability {major}.{minor}"
    if weight.dtype not in _HALF_DTYPES:
        return f"this model's weights are {str(weight.dtype).removeprefix('torch.')}"
    return None


class WeightSparsityRuntime(TechniqueRuntime):
    """`techniques.weight_sparsity`: zero each projection's low-score weights (magnitude or Wanda), unstructured
    or 2:4 (compressed for sparse tensor cores); `remove()` restores the dense weights exactly."""

    name = NAME
    config_class = WeightSparsityConfig
    order = 50  # a weight edit (registry convention 0-99): before activation sparsity (110) copies weights

    def apply(self, model: nn.Module, config: WeightSparsityConfig | dict[str, Any]) -> FunctionHandle:
        config = self.config_of(config)
        try:
            layers = group_linears(model)
        except ValueError as exc:
            raise PolicyError(f"{SECTION_PATH}: {exc}") from None
        levels = _model_levels(config, len(layers))
        method, structure = config.method, config.structure
        norms = _model_norms(config, layers) if method == "wanda" else [None] * len(layers)
        prune = zero_in_place
        if structure == TWO_FOUR:
            reason = semi_structured_problem(layers[0]["qkv"][0].weight)
            if reason:
                raise PolicyError(f"{SECTION_PATH}.structure: 2:4 needs a CUDA GPU with compute capability >= 8.0 "
                                  f"and fp16/bf16 weights; {reason}")
            prune = to_semi_structured
        undo: list[Callable[[], None]] = []
        try:
            for groups, row, layer_norms in zip(layers, levels, norms, strict=True):
                undo += _prune_layer(groups, row, method, structure, layer_norms, prune)
        except BaseException as exc:  # nothing stays pruned
            _undo_all(undo)
            if structure == TWO_FOUR and isinstance(exc, (RuntimeError, ValueError)):
                # e.g. a weight shape the 2:4 kernels do not take (multiples of 64 or so, depending on the backend)
                first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise PolicyError(f"{SECTION_PATH}.structure: cannot apply 2:4 to this model: {first_line}") from None
            raise
        return FunctionHandle(lambda: _undo_all(undo))


register_runtime(WeightSparsityRuntime())
