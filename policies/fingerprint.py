"""Model fingerprints: is this policy for this model?

A policy tuned for one model is wrong (and may crash: per-layer lists) on another, and model ids are
unreliable (local paths move, hub ids are re-uploaded), so a policy records the architecture numbers of
``model.config`` and a digest of the weights, and both ``load_policy`` and ``apply_policy`` compare them.

``weights_digest`` hashes the *sign bits* of a fixed grid of at most 64 x 64 input-embedding entries
(cast to float32). Signs survive every dtype cast (rounding never flips a sign; underflow keeps the sign
bit as -0.0), so the same weights run in float32, bfloat16 or float16 give the same digest, while two
models with different weights (random inits, fine-tunes) differ with overwhelming probability. Hashing
the values themselves would make a bf16 copy of a float32 checkpoint look like another model. It costs
one small gather (well under a millisecond on CPU).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from policies.schema import FINGERPRINT_FIELDS

__all__ = ["fingerprint_mismatches", "model_fingerprint", "weights_digest"]

_SAMPLE = 64  # rows and columns of the embedding grid the digest reads
_IGNORED_FIELDS = frozenset({"dtype"})  # the same weights in another dtype are the same model


def _text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it as ``text_config``)."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:
            return getter()
    return config


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _param_dtype(model: torch.nn.Module) -> str:
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    first = next(iter(model.parameters()), None)
    return str(first.dtype).removeprefix("torch.") if first is not None else "unknown"


def weights_digest(model: torch.nn.Module) -> str:
    """16 hex chars of sha256 over the embedding shape and the sign bits of a fixed sample grid."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("model has no 2-D input embedding weight to fingerprint")
    if weight.is_meta:
        raise ValueError("model weights are on the meta device (not loaded); cannot fingerprint them")
    rows_n, cols_n = weight.shape
    with torch.no_grad():
        rows = torch.linspace(0, rows_n - 1, steps=min(rows_n, _SAMPLE)).round().long().to(weight.device)
        cols = torch.linspace(0, cols_n - 1, steps=min(cols_n, _SAMPLE)).round().long().to(weight.device)
        sample = weight.detach().index_select(0, rows).index_select(1, cols).float()
        packed = torch.signbit(sample).to(torch.uint8).cpu().contiguous().numpy().tobytes()
    digest = hashlib.sha256(f"{rows_n}x{cols_n}:".encode() + packed)
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The ``model.fingerprint`` section of a policy for ``model`` (keys in ``FINGERPRINT_FIELDS`` order).

    Reads ``model.config`` through the standard ``PretrainedConfig`` attribute names (GPT-2 style configs
    map them via ``attribute_map``); fields a config does not state get their conventional defaults
    (``num_key_value_heads`` = heads, ``intermediate_size`` = 4 x hidden), so every field is an int.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; model_fingerprint needs a Hugging Face model")
    text = _text_config(config)
    hidden = _first_int(text, "hidden_size", "n_embd", "d_model")
    heads = _first_int(text, "num_attention_heads", "n_head")
    inter = _first_int(text, "intermediate_size", "n_inner", "ffn_dim")
    fingerprint: dict[str, Any] = {
        "architecture": str(getattr(text, "model_type", None) or getattr(config, "model_type", "") or "unknown"),
        "num_layers": _first_int(text, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": _first_int(text, "num_key_value_heads") or heads,
        "intermediate_size": inter or (4 * hidden if hidden else None),
        "vocab_size": _first_int(text, "vocab_size"),
        "dtype": _param_dtype(model),
        "weights_digest": weights_digest(model),
    }
    assert tuple(fingerprint) == FINGERPRINT_FIELDS
    return fingerprint


def fingerprint_mismatches(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """``"field expected != actual"`` for every differing field except ``dtype`` (same weights, other
    dtype). Fields are compared in the canonical order, then any extra keys, so messages are stable."""
    keys = [k for k in FINGERPRINT_FIELDS if k in expected or k in actual]
    keys += sorted((set(expected) | set(actual)) - set(FINGERPRINT_FIELDS))
    return [
        f"{key} {expected.get(key)} != {actual.get(key)}"
        for key in keys
        if key not in _IGNORED_FIELDS and expected.get(key) != actual.get(key)
    ]
