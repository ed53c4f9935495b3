"""Builders of valid policies and fake devices, for tests here and in the other packages.

They live in the package (not in a conftest) so the tuner's and reports' tests can build policies the
same way; nothing at inference time imports this module.
"""

from __future__ import annotations

from typing import Any

from policies.schema import FINGERPRINT_FIELDS, SCHEMA_VERSION

__all__ = ["fake_device", "make_policy_dict", "tiny_fingerprint"]


def fake_device(id: str = "cpu-test", kind: str = "cpu", name: str = "Test CPU", **fields: Any) -> dict[str, Any]:
    """A flat device fingerprint like ``DeviceFingerprint.to_dict()`` returns, without probing hardware."""
    return {"id": id, "kind": kind, "name": name, "index": None if kind == "cpu" else 0, **fields}


def tiny_fingerprint(**overrides: Any) -> dict[str, Any]:
    """A plausible model fingerprint (used when a test needs a policy but no model)."""
    fp: dict[str, Any] = {
        "architecture": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "dtype": "float32",
        "weights_digest": "0123456789abcdef",
    }
    fp.update(overrides)
    return {k: fp[k] for k in FINGERPRINT_FIELDS} | {k: v for k, v in fp.items() if k not in FINGERPRINT_FIELDS}


def make_policy_dict(
    fingerprint: dict[str, Any] | None = None,
    *,
    model_id: str = "builtin:tiny",
    device: dict[str, Any] | None = None,
    techniques: dict[str, Any] | None = None,
    created_at: str = "2025-01-01T00:00:00+00:00",
    measured: bool = True,
) -> dict[str, Any]:
    """A complete, valid, canonical policy mapping (what ``save_policy`` would write)."""
    d: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {"id": model_id, "fingerprint": dict(fingerprint or tiny_fingerprint())},
        "device": dict(device or fake_device()),
        "workload": {"batch_size": 1, "prompt_tokens": 128, "new_tokens": 64, "dtype": "float32", "task": "qa"},
        "objective": {
            "metric": "ttft_ms",
            "direction": "minimize",
            "quality_metric": "exact_match",
            "quality_budget": 1.0,
            "budget_met": True,
        },
        "techniques": dict(techniques or {}),
    }
    if measured:
        d["measured"] = {
            "baseline": {"ttft_ms": 12.5, "latency_ms": 300.0, "tokens_per_s": 210.0, "peak_memory_mb": 512.0,
                         "quality": 71.0, "quality_metric": "exact_match"},
            "tuned": {"ttft_ms": 8.25, "latency_ms": 250.0, "tokens_per_s": 256.0, "peak_memory_mb": 480.0,
                      "quality": 70.5, "quality_metric": "exact_match"},
        }
    d["provenance"] = {
        "tool_version": "0.1.0",
        "study": "tiny-cpu",
        "storage": "journal:./studies/tiny.log",
        "trial": 17,
        "seed": 0,
        "created_at": created_at,
    }
    return d


def tiny_llama(seed: int = 0, layers: int = 2) -> Any:
    """A small random-init Llama (hidden 64, GQA 4/2, vocab 256) in eval mode, deterministic by seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()
