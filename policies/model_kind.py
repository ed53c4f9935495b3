"""Which kind of model this is: a causal LM (decoded token by token) or a masked-diffusion LM (a denoiser).

The kind decides which techniques apply (``TechniqueRuntime.model_kinds``; ``apply_policy`` refuses a
section for the other kind before anything is touched) and which loop decodes the model when no technique
owns it (``model.generate`` for a causal LM, the one-token-per-forward diffusion loop for a denoiser).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CAUSAL_LM", "DIFFUSION_MODEL_TYPES", "MASKED_DIFFUSION", "is_masked_diffusion", "kind_problems",
           "model_kind"]

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


def kind_problems(model: Any, techniques: Any) -> list[str]:
    """``"<name>: applies to <kinds> models, not to this <kind> (<class>)"`` for every registered technique in
    ``techniques`` that does not apply to ``model``'s kind (unknown names are left to validation)."""
    from policies.registry import registered_runtimes

    runtimes, kind = registered_runtimes(), model_kind(model)
    return [f"{name}: applies to {' or '.join(runtimes[name].model_kinds)} models, not to this {kind} "
            f"({type(model).__name__})" for name in techniques
            if name in runtimes and kind not in getattr(runtimes[name], "model_kinds", (kind,))]
