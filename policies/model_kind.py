"""Which kind of model this is: a causal LM (decoded token by token) or a masked-diffusion LM (a denoiser).

The kind decides which techniques apply (``TechniqueRuntime.model_kinds``; ``apply_policy`` refuses a
section for the other kind before anything is touched) and which loop decodes the model when no technique
owns it (``model.generate`` for a causal LM, the one-token-per-forward diffusion loop for a denoiser).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CAUSAL_LM", "DIFFUSION_MODEL_TYPES", "MASKED_DIFFUSION", "is_masked_diffusion", "model_kind"]

CAUSAL_LM = "causal-lm"
MASKED_DIFFUSION = "masked-diffusion"
#: Model types of masked-diffusion LMs loaded through remote code, with their known mask token ids.
DIFFUSION_MODEL_TYPES = {"llada": 126336, "dream": 151666}


def is_masked_diffusion(model: Any) -> bool:
    """True for denoisers: ``*ForMaskedLM`` classes and LLaDA/Dream-style models (by model type)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "")).lower()
    return type(model).__name__.endswith("ForMaskedLM") or model_type in DIFFUSION_MODEL_TYPES


def model_kind(model: Any) -> str:
    """``"masked-diffusion"`` or ``"causal-lm"``."""
    return MASKED_DIFFUSION if is_masked_diffusion(model) else CAUSAL_LM
