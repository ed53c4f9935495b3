"""autotune policies: the light, inference-time half of autotune.

Load the policy tuned for this model on this device, apply it, generate::

    from policies import load_policy, apply_policy
    policy = load_policy("policies/", model)      # this device's file; None (dense) with a warning if none fits
    with apply_policy(model, policy) as tuned:    # also usable without `with`: tuned.remove()
        out = tuned.generate(input_ids, max_new_tokens=64)

This package imports only torch, PyYAML and ``profilers`` (never the tuner, Optuna or plotting libraries),
so deployments need nothing of the tuning stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> defining module. Imported lazily (PEP 562) so that `import policies` is cheap and
# `python -m policies.schema` does not import its own module twice.
_EXPORTS: dict[str, str] = {
    "SCHEMA_VERSION": "policies.schema",
    "FunctionHandle": "policies.registry",
    "ModelSpec": "policies.schema",
    "Objective": "policies.schema",
    "Policy": "policies.schema",
    "PolicyError": "policies.schema",
    "PolicyHandle": "policies.runtime",
    "PolicyWarning": "policies.schema",
    "Provenance": "policies.schema",
    "TechniqueHandle": "policies.registry",
    "TechniqueRuntime": "policies.registry",
    "Workload": "policies.schema",
    "apply_policy": "policies.runtime",
    "fingerprint_mismatches": "policies.fingerprint",
    "get_runtime": "policies.registry",
    "load_policy": "policies.store",
    "load_policy_file": "policies.io",
    "model_fingerprint": "policies.fingerprint",
    "model_slug": "policies.store",
    "policy_from_dict": "policies.schema",
    "policy_json_schema": "policies.schema",
    "policy_path": "policies.store",
    "policy_to_dict": "policies.schema",
    "register_runtime": "policies.registry",
    "registered_runtimes": "policies.registry",
    "save_policy": "policies.io",
    "validate_policy_dict": "policies.schema",
}

__all__ = [
    "FunctionHandle",
    "ModelSpec",
    "Objective",
    "Policy",
    "PolicyError",
    "PolicyHandle",
    "PolicyWarning",
    "Provenance",
    "SCHEMA_VERSION",
    "TechniqueHandle",
    "TechniqueRuntime",
    "Workload",
    "apply_policy",
    "fingerprint_mismatches",
    "get_runtime",
    "load_policy",
    "load_policy_file",
    "model_fingerprint",
    "model_slug",
    "policy_from_dict",
    "policy_json_schema",
    "policy_path",
    "policy_to_dict",
    "register_runtime",
    "registered_runtimes",
    "save_policy",
    "validate_policy_dict",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'policies' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve through __getattr__
    from policies.fingerprint import fingerprint_mismatches, model_fingerprint
    from policies.io import load_policy_file, save_policy
    from policies.registry import (
        FunctionHandle,
        TechniqueHandle,
        TechniqueRuntime,
        get_runtime,
        register_runtime,
        registered_runtimes,
    )
    from policies.runtime import PolicyHandle, apply_policy
    from policies.schema import (
        SCHEMA_VERSION,
        ModelSpec,
        Objective,
        Policy,
        PolicyError,
        PolicyWarning,
        Provenance,
        Workload,
        policy_from_dict,
        policy_json_schema,
        policy_to_dict,
        validate_policy_dict,
    )
    from policies.store import load_policy, model_slug, policy_path
