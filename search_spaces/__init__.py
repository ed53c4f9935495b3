"""Search spaces, one module per technique, registered by name.

Adding a technique: write `search_spaces/<key>.py` with a `SearchSpace` subclass that registers itself, beside
`policies/<key>.py`, and add the technique's line to `policies.registry.TECHNIQUES` (the one table both registries
read).
"""

from __future__ import annotations

from policies.registry import Registry
from search_spaces.base import Peer, Preset, SearchContext, SearchSpace, StudyInputs

__all__ = ["Peer", "Preset", "SearchContext", "SearchSpace", "StudyInputs", "get_search_space",
           "register_search_space", "registered_search_spaces", "unregister_search_space"]

_SPACES: Registry[SearchSpace] = Registry("search space", lambda t: t.search_space_module)


def register_search_space(space: SearchSpace, *, replace: bool = False) -> SearchSpace:
    """Register ``space`` under ``space.name`` (a taken name is an error unless ``replace=True``)."""
    return _SPACES.register(space, replace=replace)


def unregister_search_space(name: str) -> None:
    """Remove a search space (tests); unknown names are ignored."""
    _SPACES.unregister(name)


def registered_search_spaces() -> dict[str, SearchSpace]:
    """Every search space of the technique table, sorted by name."""
    return _SPACES.all()


def get_search_space(name: str) -> SearchSpace:
    """The search space called ``name``; ``UnknownTechniqueError`` (a ValueError) naming the known ones."""
    return _SPACES.get(name)
