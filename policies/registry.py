"""Technique runtimes, registered by name: the inference-time face of each technique plug-in.

A policy file names techniques (``techniques: {token_retention: {...}, speculative: {...}}``); this
registry maps each name to the object that can *validate* such a section (so a bad file is refused when it
is loaded, not half-way through generation) and *apply* it to a model, returning a handle whose
``remove()`` restores the model bit-identically (one loaded model serves a whole tuning study).

Built-in runtimes live in their own modules and register themselves on import; they are imported lazily
on the first lookup, so that a technique module may import this one without an import cycle and
``import policies`` stays cheap. Adding a technique = its own module + one line in
``_BUILTIN_RUNTIME_MODULES``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_ORDER",
    "DecodeStats",
    "FunctionHandle",
    "TechniqueHandle",
    "TechniqueRuntime",
    "builtin_runtime_names",
    "get_runtime",
    "register_runtime",
    "registered_runtimes",
    "unregister_runtime",
]

#: Modules that define (and register) the built-in technique runtimes. One line per technique.
_BUILTIN_RUNTIME_MODULES: tuple[str, ...] = ("policies.token_retention", "policies.speculative",
                                                "policies.sparsity",
                                                "policies.weight_sparsity", "policies.diffusion_blocks")

#: Application order of a runtime that does not say otherwise. Convention (lower runs first):
#: 0-99 weight/structure edits (e.g. sparse linears), 100-199 forward hooks (e.g. token retention),
#: 200+ techniques that own the decode loop (speculative / diffusion decoding), so a loop owner sees the
#: model as already modified by the others.
DEFAULT_ORDER = 100


class DecodeStats(ABC):
    """What a decode-loop owner's last ``generate`` did (``handle.last_stats``), in one plain shape.

    ``report_key`` names the block under which ``autotune run --json`` prints ``to_dict()``, so callers never
    guess the kind of loop from the attributes an object happens to have."""

    report_key: str = ""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The statistics as plain JSON data (ints, floats, lists)."""


class TechniqueHandle(ABC):
    """What ``TechniqueRuntime.apply`` returns: undoes the technique.

    ``remove()`` must restore the model exactly (``torch.equal`` logits) and be idempotent. A technique
    that owns the decode loop (speculative decoding, diffusion decoding) also overrides ``generate``;
    at most one technique of a policy may do so, and it sets ``last_stats`` after each call.
    """

    last_stats: DecodeStats | None = None

    @abstractmethod
    def remove(self) -> None:
        """Undo what ``apply`` did; calling it twice is a no-op."""

    def generate(self, model: Any, input_ids: Any, **kwargs: Any) -> Any:  # pragma: no cover - default
        """Decode loop of a technique that owns generation; the base class owns nothing."""
        raise NotImplementedError(f"{type(self).__name__} does not own the decode loop")

    @property
    def owns_generate(self) -> bool:
        """True when this handle overrides ``generate`` (detected, so subclasses cannot forget a flag)."""
        return type(self).generate is not TechniqueHandle.generate


class FunctionHandle(TechniqueHandle):
    """A handle from a plain undo callable: the common case for hook- or weight-based techniques."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


class TechniqueRuntime(ABC):
    """Runtime face of one technique plug-in.

    Attributes:
        name: the key of the technique's section under ``techniques:`` in a policy file.
        order: application order within a policy (see ``DEFAULT_ORDER``); ties are broken by name, so
            the order never depends on the order of sections in a file.
        owns_generate: declared statically so that a policy with two decode-loop owners is refused at
            load time rather than at apply time.
    """

    name: str
    order: int = DEFAULT_ORDER
    owns_generate: bool = False
    #: The kinds of model the technique applies to (``policies.diffusion_blocks.model_kind``): a policy section
    #: for another kind is refused by ``apply_policy`` before anything is touched.
    model_kinds: tuple[str, ...] = ("causal-lm",)

    @abstractmethod
    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        """All problems of ``section``, each prefixed with its field path (``path`` is e.g.
        ``"techniques.token_retention"``, so a problem reads ``techniques.token_retention.keep[3]: ...``)."""

    @abstractmethod
    def apply(self, model: Any, section: dict[str, Any]) -> TechniqueHandle:
        """Modify ``model`` in place per ``section`` (already validated) and return the undo handle."""

    def json_schema(self) -> dict[str, Any] | None:
        """Optional JSON Schema of the section, merged into ``policy.schema.json`` for editors."""
        return None


_RUNTIMES: dict[str, TechniqueRuntime] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    """Import the built-in runtime modules once (they call ``register_runtime`` at import)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # set first: a module importing the registry must not recurse
    for module in _BUILTIN_RUNTIME_MODULES:
        importlib.import_module(module)


def register_runtime(runtime: TechniqueRuntime, *, replace: bool = False) -> TechniqueRuntime:
    """Register ``runtime`` under ``runtime.name``; returns it (usable as a decorator on instances).

    Registering a second runtime under a taken name is an error unless ``replace=True``: silently
    shadowing a technique would make the same policy file mean two different things.
    """
    _load_builtins()
    name = getattr(runtime, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"technique runtime name must be an identifier string, got {name!r}")
    for attr in ("validate", "apply"):
        if not callable(getattr(runtime, attr, None)):
            raise TypeError(f"technique runtime {name!r} has no callable {attr}()")
    if name in _RUNTIMES and _RUNTIMES[name] is not runtime and not replace:
        raise ValueError(f"a technique runtime named {name!r} is already registered")
    _RUNTIMES[name] = runtime
    return runtime


def unregister_runtime(name: str) -> None:
    """Remove a runtime (tests and interactive experiments); unknown names are ignored."""
    _RUNTIMES.pop(name, None)


def get_runtime(name: str) -> TechniqueRuntime:
    """The runtime registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    _load_builtins()
    try:
        return _RUNTIMES[name]
    except KeyError:
        raise KeyError(f"unknown technique {name!r} (known: {_known_names()})") from None


def registered_runtimes() -> dict[str, TechniqueRuntime]:
    """A copy of the registry, sorted by name."""
    _load_builtins()
    return {name: _RUNTIMES[name] for name in sorted(_RUNTIMES)}


def builtin_runtime_names() -> list[str]:
    """Names of the runtimes shipped with autotune (the ones ``policy.schema.json`` describes)."""
    _load_builtins()
    return sorted(n for n, rt in _RUNTIMES.items() if type(rt).__module__ in _BUILTIN_RUNTIME_MODULES)


def _known_names() -> str:
    return ", ".join(sorted(_RUNTIMES)) or "none registered"


def runtime_order(runtime: TechniqueRuntime) -> tuple[int, str]:
    """Sort key of the documented application order: (``order``, ``name``)."""
    return (int(getattr(runtime, "order", DEFAULT_ORDER)), runtime.name)


def runtime_owns_generate(runtime: TechniqueRuntime) -> bool:
    return bool(getattr(runtime, "owns_generate", False))
