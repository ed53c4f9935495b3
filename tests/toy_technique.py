"""A small but real technique used only by the tests to drive the tuning pipeline end to end.

Adding it takes what adding any technique takes: its two modules (`tests/toy_policy.py`: config class and
runtime; `tests/toy_search_space.py`: search space) and one line in the technique table, `TOY` below.
"""

from __future__ import annotations

from policies.registry import TECHNIQUES, Technique

NAME = "norm_scale"
#: The toy's line of the technique table.
TOY = Technique(NAME, runtime_module="tests.toy_policy", search_space_module="tests.toy_search_space")


def register() -> None:
    """Add the toy's line to the technique table (idempotent); its modules load on first lookup."""
    if TOY not in TECHNIQUES:
        TECHNIQUES.append(TOY)
