"""Find the profiled parts of a Hugging Face decoder-only model.

The per-layer profiler, the cost model and the technique runtimes all need the same four handles:
token embedding, the list of decoder layers, the final norm and the LM head.  HF models spell them
differently per family, so the lookup lives in one table here instead of being re-guessed everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ModelParts", "decoder_parts"]


@dataclass
class ModelParts:
    """Handles into a decoder-only model (the modules themselves, not copies).

    ``rotary`` is the shared rotary-embedding module where the family has one (Llama-style); it is not
    profiled as a part because its cost is tiny and shared, but runtimes that move positions need it.
    ``base`` is the backbone that owns the layers (``model.model`` / ``model.transformer``)."""

    embed: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None = None
    base: nn.Module | None = None
    layers_path: str = ""


# (backbone attribute, embedding, layer list, final norm) per family, most common first.  A path
# component may itself be dotted (OPT keeps everything under model.decoder).
_LAYOUTS: tuple[tuple[str, str, str, str], ...] = (
    ("model", "embed_tokens", "layers", "norm"),  # Llama, Mistral, Qwen2/3, Phi-3, Gemma, ...
    ("transformer", "wte", "h", "ln_f"),  # GPT-2, GPT-J, CodeGen, Bloom-ish
    ("transformer", "word_embeddings", "h", "ln_f"),  # Falcon, Bloom
    ("gpt_neox", "embed_in", "layers", "final_layer_norm"),  # Pythia / GPT-NeoX
    ("model.decoder", "embed_tokens", "layers", "final_layer_norm"),  # OPT
    ("model", "embed_tokens", "layers", "final_layernorm"),  # Phi-1/2
)
_HEADS = ("lm_head", "embed_out")


def _get(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_parts(model: nn.Module) -> ModelParts:
    """Locate embed / layers / final norm / LM head of a causal LM; ``ValueError`` naming the class
    when the layout is not one we know (so callers fail early instead of profiling half a model)."""
    head = next((h for name in _HEADS if isinstance(h := getattr(model, name, None), nn.Module)), None)
    if head is None and hasattr(model, "get_output_embeddings"):
        try:
            out = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            out = None
        head = out if isinstance(out, nn.Module) else None
    for base_path, embed_name, layers_name, norm_name in _LAYOUTS:
        base = _get(model, base_path)
        if not isinstance(base, nn.Module):
            continue
        embed = getattr(base, embed_name, None)
        layers = getattr(base, layers_name, None)
        norm = getattr(base, norm_name, None)
        if not (isinstance(embed, nn.Module) and isinstance(layers, (nn.ModuleList, nn.Sequential))):
            continue
        if not isinstance(norm, nn.Module) or head is None:
            continue
        rotary = getattr(base, "rotary_emb", None)
        return ModelParts(
            embed=embed,
            layers=list(layers),
            norm=norm,
            lm_head=head,
            rotary=rotary if isinstance(rotary, nn.Module) else None,
            base=base,
            layers_path=f"{base_path}.{layers_name}",
        )
    raise ValueError(
        f"unsupported model class {type(model).__name__}: expected a Hugging Face decoder-only causal LM "
        "(model.embed_tokens/layers/norm + lm_head, or transformer.wte/h/ln_f + lm_head)"
    )
