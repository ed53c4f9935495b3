"""Checkpoints a policy names besides the target (a speculative draft model), loaded without the tuner.

A policy may say ``draft_model: builtin:tiny-draft`` or ``draft_model: /models/my-draft``. The runtime loads a
local Hugging Face directory itself (``local_files_only``: no model hub, ever). Named checkpoints such as
``builtin:NAME`` belong to whoever ships them: a resolver registered for the prefix
(``register_checkpoint_resolver``), or else one declared as a package entry point in the group
``autotune.checkpoint_resolvers`` under the prefix's name (autotune declares ``builtin`` ->
``tuner.models:resolve_model_path``). The runtime never imports the tuner by name, and a deployment that ships
its own draft directory needs nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_causal_lm", "register_checkpoint_resolver", "resolve_checkpoint"]

ENTRY_POINT_GROUP = "autotune.checkpoint_resolvers"
_RESOLVERS: dict[str, Callable[[str], Path]] = {}


class CheckpointError(ValueError):
    """A checkpoint spec that names nothing loadable; the message is one line."""


def register_checkpoint_resolver(prefix: str, resolve: Callable[[str], Path]) -> None:
    """Resolve specs starting with ``prefix`` (e.g. ``"builtin:"``) to a checkpoint directory with ``resolve``."""
    _RESOLVERS[prefix] = resolve


def resolve_checkpoint(spec: str) -> Path:
    """The checkpoint directory ``spec`` names: a registered prefix's resolver, else a local directory."""
    for prefix, resolve in _RESOLVERS.items():
        if spec.startswith(prefix):
            return Path(resolve(spec))
    head = spec.split("/")[0]
    if ":" in head and not Path(spec).exists():
        name = head.split(":")[0]
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise CheckpointError(f"no resolver for {name}: checkpoints ({spec!r}): no package declares one in the "
                                  f"entry-point group {ENTRY_POINT_GROUP}")
        register_checkpoint_resolver(f"{name}:", found[0].load())
        return resolve_checkpoint(spec)
    path = Path(os.path.expanduser(spec))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {spec!r} not found: a local Hugging Face directory with a config.json "
                              "is needed (no model hub is used)")
    return path


def load_causal_lm(spec: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """``AutoModelForCausalLM`` from the checkpoint ``spec`` names, in eval mode on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_checkpoint(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot load checkpoint {spec!r}: {first_line}") from exc
    return model.to(device).eval()
