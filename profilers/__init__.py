"""Profilers: device fingerprints, timers, decoder part lookup and the per-layer profiler.

A leaf package (imports nothing else from autotune).  Names are re-exported lazily so that
``import profilers`` stays cheap on the inference path (``policies`` only needs ``profilers.device``;
the layer profiler pulls in pandas).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeviceFingerprint": "device",
    "current_cpu": "device",
    "list_devices": "device",
    "resolve_device": "device",
    "torch_device": "device",
    "TimingResult": "timing",
    "synchronize": "timing",
    "time_callable": "timing",
    "ModelParts": "model_parts",
    "decoder_parts": "model_parts",
    "CurveInterpolator": "layer_profiler",
    "LayerRecord": "layer_profiler",
    "ModelProfile": "layer_profiler",
    "interpolate_forward_latency": "layer_profiler",
    "interpolate_latency": "layer_profiler",
    "load_curves": "layer_profiler",
    "profile_curves": "layer_profiler",
    "profile_model": "layer_profiler",
    "save_curves": "layer_profiler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'profilers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"profilers.{module}"), name)
