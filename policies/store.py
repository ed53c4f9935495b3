"""The per-device policy store and the selection of the policy that fits this model on this device.

Layout: ``ROOT/<model-slug>/<device-id>.yaml`` (``policy_path``), so one directory can ship policies for
a fleet of machines and every machine picks its own. Selection (``load_policy`` on a directory):

1. keep only the policies whose model fingerprint matches the model (invalid files: warned and skipped —
   one bad file must never take inference down);
2. pick, in this order: the exact device id; else the same device name and kind (an identical GPU or CPU
   model: the tuned numbers carry over); else the same kind (``PolicyWarning`` naming the chosen file:
   the techniques still work but the tuning was for other hardware); else ``None`` = dense model, with a
   ``PolicyWarning``;
3. ties inside a tier: the model's dtype first (``<device-id>.<dtype>.yaml`` beside ``<device-id>.yaml``), then
   newest ``provenance.created_at``, then the path (lexicographic).

``strict=True`` turns every "return None" (no file, no policy for this model, none for this device kind)
into a ``PolicyError``; it does not refuse the same-kind fallback, which still warns.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policies.fingerprint import fingerprint_mismatches, model_fingerprint
from policies.io import load_policy_file
from policies.schema import Policy, PolicyError, PolicyWarning, _parse_timestamp

__all__ = ["load_policy", "model_slug", "policy_path", "resolve_device_dict", "select_policy"]

_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def _slug(text: str, what: str) -> str:
    lowered = text.strip().lower().replace("\\", "/")
    parts = [_UNSAFE.sub("-", part).strip("-.") for part in lowered.split("/")]
    slug = "--".join(p for p in parts if p)
    if not slug:
        raise ValueError(f"{what} {text!r} has no filename-safe characters")
    return slug


def model_slug(model_id: str) -> str:
    """Filename-safe, lower-case directory name for a model id.

    ``"builtin:tiny"`` -> ``"builtin-tiny"``, ``"meta-llama/Llama-3-8B"`` -> ``"meta-llama--llama-3-8b"``:
    path separators become ``--`` (so org and name stay distinguishable), any other unsafe run becomes
    ``-``, and no component can be ``.``/``..`` or start with a dot (no hidden or escaping paths).
    """
    return _slug(model_id, "model id")


def policy_path(root: str | os.PathLike[str], model_id: str, device_id: str, dtype: str = "float32") -> Path:
    """``ROOT/<model-slug>/<device-id>.yaml``, where the tuner writes and the store looks; a workload in another
    dtype than float32 gets ``<device-id>.<dtype>.yaml`` (the same device may carry one policy per dtype; the
    store picks by the model's fingerprint, which records its dtype)."""
    suffix = "" if dtype == "float32" else f".{_slug(dtype, 'dtype')}"
    return Path(root) / model_slug(model_id) / f"{_slug(device_id, 'device id')}{suffix}.yaml"


def resolve_device_dict(device: Any = None) -> dict[str, Any]:
    """Flat device fingerprint of ``device``: a ``DeviceFingerprint``, a flat dict, a spec string
    (``"cpu"``, ``"cuda:1"``, a device id) or None (this machine's default device)."""
    if device is None or isinstance(device, str):
        from profilers.device import resolve_device  # lazy: the store must import without probing devices

        try:
            return dict(resolve_device(device).to_dict())
        except ValueError as exc:
            raise PolicyError(f"device: {exc}") from None
    if hasattr(device, "to_dict"):
        return dict(device.to_dict())
    if isinstance(device, Mapping):
        return dict(device)
    raise TypeError(f"device must be a DeviceFingerprint, a dict, a spec string or None, got {type(device).__name__}")


def _describe(device: Mapping[str, Any]) -> str:
    return f"{device.get('id')} ({device.get('kind')}, {device.get('name')})"


def _tier(policy_device: Mapping[str, Any], device: Mapping[str, Any]) -> int | None:
    """0 exact id, 1 same name and kind, 2 same kind, None unusable."""
    if policy_device.get("id") == device.get("id"):
        return 0
    if policy_device.get("kind") != device.get("kind"):
        return None
    if policy_device.get("name") == device.get("name"):
        return 1
    return 2


def _newest_first_key(item: tuple[Path, Policy]) -> tuple[float, str]:
    path, policy = item
    created = _parse_timestamp(policy.provenance.created_at) or _EPOCH
    return (-(created - _EPOCH).total_seconds(), str(path))


def select_policy(
    candidates: list[tuple[Path, Policy]], device: Mapping[str, Any], dtype: str | None = None
) -> tuple[Path, Policy, int] | None:
    """Best (path, policy, tier) among model-matching candidates for ``device``; pure, no warnings. Inside a
    tier a policy tuned for the model's ``dtype`` wins over one tuned for another (timings differ by dtype)."""
    best: tuple[tuple[int, bool, tuple[float, str]], Path, Policy] | None = None
    for path, policy in candidates:
        tier = _tier(policy.device, device)
        if tier is None:
            continue
        other_dtype = dtype is not None and policy.workload.dtype != dtype
        key = (tier, other_dtype, _newest_first_key((path, policy)))
        if best is None or key < best[0]:
            best = (key, path, policy)
    return None if best is None else (best[1], best[2], best[0][0])


def _policy_files(root: Path) -> list[Path]:
    files: set[Path] = set()
    for pattern in ("*.yaml", "*.yml", "*/*.yaml", "*/*.yml"):
        files.update(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
    return sorted(files)


def _fallback(message: str, strict: bool) -> None:
    if strict:
        raise PolicyError(message)
    warnings.warn(f"{message}; running the dense model", PolicyWarning, stacklevel=3)


def load_policy(
    dir_or_file: str | os.PathLike[str],
    model: Any,
    device: Any = None,
    strict: bool = False,
) -> Policy | None:
    """The policy to apply to ``model`` on ``device``, or None (= run dense).

    A FILE is loaded and refused (``PolicyError`` naming the differing fields) when it is for another
    model; if it was tuned on another device it is still used, with a ``PolicyWarning``. A DIRECTORY is
    searched as described in the module docstring. A path that does not exist is always an error (a typo
    must not silently mean "dense").
    """
    root = Path(dir_or_file)
    if not root.exists():
        raise PolicyError("no such file or directory", str(dir_or_file))
    actual = model_fingerprint(model)
    dev = resolve_device_dict(device)

    if not root.is_dir():
        policy = load_policy_file(root)
        mismatches = fingerprint_mismatches(policy.model.fingerprint, actual)
        if mismatches:
            raise PolicyError(f"policy is for another model: {', '.join(mismatches)}", str(root))
        if _tier(policy.device, dev) != 0:
            warnings.warn(
                f"{root}: policy was tuned on {_describe(policy.device)}, using it on {_describe(dev)}",
                PolicyWarning,
                stacklevel=2,
            )
        return policy

    files = _policy_files(root)
    if not files:
        _fallback(f"{root}: no policy files (*.yaml) in this directory", strict)
        return None
    matching: list[tuple[Path, Policy]] = []
    other_models: list[str] = []
    for path in files:
        try:
            policy = load_policy_file(path)
        except PolicyError as exc:
            warnings.warn(f"skipping invalid policy file {exc}", PolicyWarning, stacklevel=2)
            continue
        mismatches = fingerprint_mismatches(policy.model.fingerprint, actual)
        if mismatches:
            other_models.append(f"{path.relative_to(root)} ({', '.join(mismatches)})")
        else:
            matching.append((path, policy))
    if not matching:
        detail = f"; for other models: {'; '.join(other_models[:3])}" if other_models else ""
        more = f" (+{len(other_models) - 3} more)" if len(other_models) > 3 else ""
        _fallback(f"{root}: no valid policy for this model among {len(files)} file(s){detail}{more}", strict)
        return None

    chosen = select_policy(matching, dev, dtype=actual.get("dtype"))
    if chosen is None:
        have = ", ".join(sorted({_describe(p.device) for _, p in matching}))
        _fallback(f"{root}: no policy for device {_describe(dev)} (policies exist for: {have})", strict)
        return None
    path, policy, tier = chosen
    if tier == 2:
        warnings.warn(
            f"{path}: no policy for device {_describe(dev)}; using the one tuned on {_describe(policy.device)}"
            " (same kind, other hardware: re-tune for best results)",
            PolicyWarning,
            stacklevel=2,
        )
    return policy
