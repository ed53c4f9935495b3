"""Function-preserving widening of Llama-style models (Net2Net), and the generator of ``builtin:tiny-wide``.

Why: ``builtin:tiny``'s matrices are so small that per-forward framework overhead dominates decode on a
CPU, so compute-bound techniques (sparse kernels...) can never win on it.  Widening it by Net2Net
(Chen et al. 2016, "Net2Net: Accelerating Learning via Knowledge Transfer") gives a model whose matmuls
dominate decode while computing the *same function* (same logits up to float rounding), so its quality
is known without training or evaluating anything.

Recipe for factor ``k`` (copy-major: new index = copy * old_size + old_index, i.e. ``torch.tile``):
every hidden channel, attention head and MLP neuron is replicated ``k`` times, so every activation of
the wide model is ``k`` tiled copies of the narrow one's.  The embedding and the RMSNorm weights are tiled
(the mean of squares over tiled channels is unchanged, so the norm is exact); every projection
``W`` becomes ``tile(W, (k, k)) / k`` (each output reads ``k`` copies of each input, hence ``/ k``);
the LM head becomes ``tile(E, (1, k)) / k`` and is untied from the embedding (a tied head would scale
the logits by ``k``).  ``head_dim`` is kept, so the softmax scale and RoPE are unchanged, and with
copy-major ordering query head ``c * H + h`` reads KV head ``c * G + h // (H / G)``, copy ``c`` of the
KV head the original head ``h`` read.

The widened ``builtin:tiny-wide`` (factor 4, ~70M parameters, ~280 MB fp32) is too big to commit, so
:func:`materialize_wide` generates it into the cache on first use (see :mod:`tuner.builtin`).
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tuner.builtin.cache import publish_checkpoint

__all__ = ["TINY_WIDE_FACTOR", "materialize_wide", "widen_llama"]

TINY_WIDE_FACTOR = 4
SOURCE = "builtin:tiny"

# Parameter-name suffixes of a Llama decoder and how each widens; any other parameter is refused, so a
# model with extra parts (biases, q/k norms over head_dim, MoE experts...) fails loudly, not silently wrong.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
_WIDENED_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def _tile_projection(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """``(out, in) -> (k*out, k*in)``: each output reads ``k`` copies of each input, hence the ``/ k``."""
    return torch.tile(weight, (factor, factor)) / factor


def _tile_channels(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """Tile along the last (hidden) dimension: embedding rows, RMSNorm scales."""
    return torch.tile(weight, (1,) * (weight.dim() - 1) + (factor,))


def _widen_rule(name: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """How parameter ``name`` widens, or ``ValueError`` for a parameter that is not plain Llama."""
    parts = name.split(".")
    if parts[-1] == "bias":
        raise ValueError(f"widen_llama: biases are not supported (found {name!r})")
    module = parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else ""
    if module in _PROJECTIONS:
        return _tile_projection
    if module in _NORMS or module == "embed_tokens":
        return _tile_channels
    raise ValueError(f"widen_llama: parameter {name!r} is not part of a plain Llama decoder")


def _check_widenable(model: Any, factor: int) -> None:
    """Refuse inputs the recipe would silently get wrong (bad factor, biases, missing config fields)."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"widen_llama: factor must be a positive integer, got {factor!r}")
    config = model.config
    missing = [f for f in _WIDENED_SIZES if getattr(config, f, None) is None]
    if missing:
        raise ValueError(f"widen_llama: not a Llama-style config (missing {', '.join(missing)})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("widen_llama: models with attention or MLP biases are not supported")
    if model.get_output_embeddings() is None:
        raise ValueError("widen_llama: the model has no LM head (use a *ForCausalLM model)")


def _head_dim(config: Any) -> int:
    """The attention head size; configs may leave it implicit (hidden_size / num_attention_heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _widened_config(config: Any, factor: int) -> Any:
    """``config`` with every width multiplied by ``factor``, ``head_dim`` kept and the LM head untied."""
    wide = copy.deepcopy(config)
    wide.head_dim = _head_dim(config)  # explicit: hidden / heads is unchanged, but say so
    for field in _WIDENED_SIZES:
        setattr(wide, field, getattr(config, field) * factor)
    wide.tie_word_embeddings = False
    return wide


def widen_llama(model: Any, factor: int) -> Any:
    """A new model computing the same function as the Llama-style causal LM ``model``, ``factor`` times wider.

    ``model`` is left untouched; tied or untied embeddings are accepted, and the result always has an
    untied LM head.  Raises ``ValueError`` for a bad ``factor`` or a model that is not a plain
    bias-free Llama decoder (see the module docstring for the recipe).
    """
    _check_widenable(model, factor)
    head = model.get_output_embeddings().weight
    state = {name: _widen_rule(name)(tensor, factor) for name, tensor in model.state_dict().items()
             if not name.startswith("lm_head.")}
    state["lm_head.weight"] = torch.tile(head.detach(), (1, factor)) / factor
    wide = type(model)(_widened_config(model.config, factor))
    wide.load_state_dict(state, strict=True)
    wide.generation_config = copy.deepcopy(model.generation_config)
    return wide.to(dtype=head.dtype, device=head.device).eval()


def _load_source() -> tuple[Any, Any]:
    """``builtin:tiny`` in fp32 on the CPU, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.builtin import builtin_checkpoint

    path = builtin_checkpoint(SOURCE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def materialize_wide(out_dir: str | os.PathLike[str], factor: int = TINY_WIDE_FACTOR) -> Path:
    """Write ``builtin:tiny`` widened by ``factor`` to ``out_dir`` as a normal Hugging Face checkpoint.

    Why atomic: the checkpoint is generated on first use into a shared cache, so a crash or ^C must never
    leave a half-written directory that later loads would trust.  It is written into a temporary
    directory beside ``out_dir`` and renamed into place.  The result is deterministic (no randomness,
    no timestamps), so concurrent generators racing for ``out_dir`` produce the same files.
    """
    source, tokenizer = _load_source()
    wide = widen_llama(source, factor)

    def write(tmp: Path) -> None:
        wide.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    out = publish_checkpoint(Path(out_dir), write)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tuner.builtin.widen OUT_DIR [--factor K]``: generate a widened ``builtin:tiny`` by hand."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--factor", type=int, default=TINY_WIDE_FACTOR)
    args = ap.parse_args(argv)
    print(materialize_wide(args.out_dir, args.factor))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
