"""Search spaces, one module per technique, registered by name.

Adding a technique: write `search_spaces/<name>.py` with a `SearchSpace` subclass and add one line to
`_BUILTIN_MODULES` below (its runtime registers itself in `policies/`).
"""

from __future__ import annotations

import importlib

from search_spaces.base import Peer, Preset, SearchContext, SearchSpace, StudyInputs

__all__ = ["Peer", "Preset", "SearchContext", "SearchSpace", "StudyInputs", "get_search_space",
           "register_search_space", "registered_search_spaces"]

_REGISTRY: dict[str, SearchSpace] = {}
# One line per technique shipped with autotune: "module path" (imported lazily on first lookup).
_BUILTIN_MODULES: tuple[str, ...] = ("search_spaces.token_retention", "search_spaces.speculative",
                                     "search_spaces.sparsity", "search_spaces.weight_sparsity",
                                     "search_spaces.diffusion_blocks")
_loaded = False


def register_search_space(space: SearchSpace) -> SearchSpace:
    """Register (or replace) a search space under `space.name`."""
    if not space.name:
        raise ValueError("a search space needs a non-empty name")
    _REGISTRY[space.name] = space
    return space


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def registered_search_spaces() -> dict[str, SearchSpace]:
    _load_builtins()
    return dict(_REGISTRY)


def get_search_space(name: str) -> SearchSpace:
    """The search space called `name`, or a ValueError listing the known techniques."""
    spaces = registered_search_spaces()
    if name not in spaces:
        known = ", ".join(sorted(spaces)) or "none registered"
        raise ValueError(f"unknown technique {name!r}; known: {known}")
    return spaces[name]
