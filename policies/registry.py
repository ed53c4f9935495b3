"""The technique table, one registry helper, and the runtime face of each technique plug-in.

A policy file names techniques (``techniques: {token_retention: {...}, speculative: {...}}``). Each technique is
one plug-in with two modules named after its key, listed once in ``TECHNIQUES``:

- ``policies/<key>.py``: its config class (the only copy of the section's schema, ``policies.config``) and its
  runtime, which *validates* a section (so a bad file is refused when it is loaded, not half-way through
  generation) and *applies* a config to a model, returning a handle whose ``remove()`` restores the model
  bit-identically (one loaded model serves a whole tuning study);
- ``search_spaces/<key>.py``: its search space (read by ``search_spaces``, never imported from here).

Both registries are ``Registry`` objects: a module registers its object on import; the first lookup of a name in
the table imports that module, so ``import policies`` stays cheap and the tuning stack is never imported by the
runtime. Adding a technique = its two modules + one line in ``TECHNIQUES``. Registering a second object under a
taken name is an error unless ``replace=True``; looking up a name nobody registered raises
``UnknownTechniqueError`` naming the known ones.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from policies.config import TechniqueConfig

__all__ = [
    "BUILTIN_TECHNIQUES",
    "DEFAULT_ORDER",
    "Registry",
    "TECHNIQUES",
    "Technique",
    "UnknownTechniqueError",
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

@dataclass(frozen=True)
class Technique:
    """One line of the technique table: its key and the modules of its two faces."""

    key: str
    runtime_module: str
    search_space_module: str

    @classmethod
    def builtin(cls, key: str) -> Technique:
        """A technique shipped with autotune: ``policies/<key>.py`` and ``search_spaces/<key>.py``."""
        return cls(key, f"policies.{key}", f"search_spaces.{key}")


#: The techniques autotune ships, one line each (tests add a toy technique the same way).
TECHNIQUES: list[Technique] = [
    Technique.builtin("token_retention"),
    Technique.builtin("speculative"),
    Technique.builtin("sparsity"),
    Technique.builtin("weight_sparsity"),
    Technique.builtin("diffusion_blocks"),
]
BUILTIN_TECHNIQUES: tuple[str, ...] = tuple(t.key for t in TECHNIQUES)


class UnknownTechniqueError(KeyError, ValueError):
    """A technique name nobody registered (a ``KeyError`` for lookups, a ``ValueError`` for bad input)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered by ``.name``, the table's modules imported on first lookup.

    ``module_of`` says which module of a table line defines this registry's object (the runtime's or the
    search space's); ``what`` names the objects in messages."""

    def __init__(self, what: str, module_of: Callable[[Technique], str]) -> None:
        self._what = what
        self._module_of = module_of
        self._items: dict[str, T] = {}
        self._imported: set[str] = set()

    def _import(self, technique: Technique) -> None:
        module = self._module_of(technique)
        if module not in self._imported:
            self._imported.add(module)  # first: a module that looks names up while importing must not recurse
            try:
                importlib.import_module(module)
            except BaseException:
                self._imported.discard(module)  # the real error again next time, not "unknown technique"
                raise

    def _import_all(self) -> None:
        for technique in list(TECHNIQUES):
            self._import(technique)

    def register(self, item: T, *, replace: bool = False) -> T:
        """Register ``item`` under ``item.name``; a taken name is an error unless ``replace=True``: silently
        shadowing a technique would make the same policy file mean two different things."""
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self._what} name must be an identifier string, got {name!r}")
        if name in self._items and self._items[name] is not item and not replace:
            raise ValueError(f"a {self._what} named {name!r} is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove an object (tests and interactive experiments); unknown names are ignored."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``UnknownTechniqueError`` naming the known ones otherwise."""
        if name not in self._items:
            for technique in list(TECHNIQUES):
                if technique.key == name:
                    self._import(technique)
        if name not in self._items:
            self._import_all()
            known = ", ".join(sorted(self._items)) or "none registered"
            raise UnknownTechniqueError(f"unknown technique {name!r} (known: {known})")
        return self._items[name]

    def all(self) -> dict[str, T]:
        """Every registered object (the table's modules imported), sorted by name."""
        self._import_all()
        return {name: self._items[name] for name in sorted(self._items)}


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

    #: The technique's config class: the only copy of its section's schema (``policies.config``).
    config_class: type[TechniqueConfig]

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        """All problems of ``section``, each prefixed with its field path (``path`` is e.g.
        ``"techniques.token_retention"``, so a problem reads ``techniques.token_retention.keep[3]: ...``)."""
        return self.config_class.section_problems(section, path)

    def config_of(self, config: Any) -> Any:
        """``config`` itself, or the validated config of a section mapping (``PolicyError`` when invalid)."""
        if isinstance(config, self.config_class):
            return config
        return self.config_class.from_section(config, f"techniques.{self.name}")

    @abstractmethod
    def apply(self, model: Any, config: Any) -> TechniqueHandle:
        """Modify ``model`` in place per ``config`` (its config class, or a section: see ``config_of``) and return
        the undo handle. On failure nothing stays modified."""

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of the section (from the config class), merged into ``policy.schema.json``."""
        return self.config_class.json_schema()


_RUNTIMES: Registry[TechniqueRuntime] = Registry("technique runtime", lambda t: t.runtime_module)


def register_runtime(runtime: TechniqueRuntime, *, replace: bool = False) -> TechniqueRuntime:
    """Register ``runtime`` under ``runtime.name`` (see ``Registry.register``); returns it."""
    for attr in ("validate", "apply"):
        if not callable(getattr(runtime, attr, None)):
            raise TypeError(f"technique runtime {getattr(runtime, 'name', None)!r} has no callable {attr}()")
    return _RUNTIMES.register(runtime, replace=replace)


def unregister_runtime(name: str) -> None:
    """Remove a runtime (tests and interactive experiments); unknown names are ignored."""
    _RUNTIMES.unregister(name)


def get_runtime(name: str) -> TechniqueRuntime:
    """The runtime registered as ``name``; ``UnknownTechniqueError`` naming the known ones otherwise."""
    return _RUNTIMES.get(name)


def registered_runtimes() -> dict[str, TechniqueRuntime]:
    """Every registered runtime, sorted by name."""
    return _RUNTIMES.all()


def builtin_runtime_names() -> list[str]:
    """Names of the runtimes shipped with autotune (the ones ``policy.schema.json`` describes)."""
    return sorted(BUILTIN_TECHNIQUES)


def runtime_order(runtime: TechniqueRuntime) -> tuple[int, str]:
    """Sort key of the documented application order: (``order``, ``name``)."""
    return (int(getattr(runtime, "order", DEFAULT_ORDER)), runtime.name)


def runtime_owns_generate(runtime: TechniqueRuntime) -> bool:
    return bool(getattr(runtime, "owns_generate", False))
