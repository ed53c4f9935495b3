"""The one module that knows how the installed transformers spells its KV cache.

transformers 5.24 renamed the cache keyword of every forward (``*ForCausalLM``, the backbone, each decoder
layer and attention) from ``past_key_values`` to ``cache``, and model outputs carry ``.cache``. The old name is
still accepted through a ``@deprecate_kwarg`` decorator that renames it *after* forward hooks have run and warns
(``FutureWarning``) on every call; reading ``output.past_key_values`` logs a deprecation line too. Releases up to
5.23, and remote-code models written against them (LLaDA, Dream), use ``past_key_values`` throughout.

So the runtimes, profilers and tuner never spell either name: they ask this module

- :func:`cache_kwarg` / :func:`cache_arg` -- how to pass a cache to a given module's ``forward``;
- :func:`hook_cache` -- the cache a forward pre-hook received, under whichever name the caller used;
- :func:`output_cache` -- the cache a model output carries, without touching the deprecated shim;
- :func:`new_dynamic_cache` -- a fresh ``DynamicCache`` laid out for a model config.

It lives in ``profilers/`` because the core profilers may import nothing outside that package, while
``policies/`` may import ``profilers/``. The supported transformers range is in ``pyproject.toml``;
``tests/test_hf_compat.py`` pins this seam down on the installed release, and CI runs the hook-facing tests on
the oldest supported release as well.
"""

from __future__ import annotations

import inspect
from typing import Any

NEW_NAME = "cache"  # transformers >= 5.24
OLD_NAME = "past_key_values"  # transformers <= 5.23 and remote code written against it
CACHE_NAMES = (NEW_NAME, OLD_NAME)

_KWARG_BY_TYPE: dict[type, str] = {}


def _installed_default() -> str:
    """The name the installed transformers' own models use (read off a stock forward, not a version table)."""
    from transformers import LlamaModel

    return NEW_NAME if NEW_NAME in inspect.signature(LlamaModel.forward).parameters else OLD_NAME


def cache_kwarg(module: Any) -> str:
    """The keyword ``module``'s forward takes its cache under.

    Read from the forward's signature (``inspect`` follows the deprecation decorator to the real parameters),
    so a remote-code model that still says ``past_key_values`` gets that name on a transformers that says
    ``cache``. A forward that names neither (``**kwargs`` only) gets the installed release's own name."""
    module = _unwrap(module)
    kind = type(module)
    name = _KWARG_BY_TYPE.get(kind)
    if name is None:
        try:
            params = inspect.signature(kind.forward).parameters
        except (TypeError, ValueError, AttributeError):
            params = {}
        name = next((n for n in CACHE_NAMES if n in params), None) or _installed_default()
        _KWARG_BY_TYPE[kind] = name
    return name


def _unwrap(module: Any) -> Any:
    """The model inside a ``**kwargs``-only wrapper: ``torch.compile``'s ``_orig_mod``, PEFT's base model."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = getattr(module, "_orig_mod", None)
        if inner is None and callable(getattr(module, "get_base_model", None)):
            inner = module.get_base_model()
        if inner is None or inner is module:
            return module
        module = inner
    return module


def cache_arg(module: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to splat into a call of ``module``: ``model(ids, **cache_arg(model, kv))``."""
    return {cache_kwarg(module): cache}


def hook_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward pre-hook's ``kwargs`` (or a bound ``**kwargs``), under either spelling.

    Hooks run before transformers' deprecation decorator renames the keyword, so the outermost forward sees
    what its caller wrote and inner modules see what the installed release passes down."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``.cache`` on >= 5.24, ``.past_key_values`` before), or None.

    Read with ``dict``'s own methods: ``ModelOutput`` overrides ``in``, ``[]`` and the ``past_key_values``
    property to map the old name to the new one with a logged deprecation line."""
    if not isinstance(output, dict):  # ModelOutput is an OrderedDict of its non-None fields; a tensor has none
        return None
    for name in CACHE_NAMES:
        if dict.__contains__(output, name):
            return dict.__getitem__(output, name)
    return None


def new_dynamic_cache(config: Any = None) -> Any:
    """A fresh ``DynamicCache`` laid out for ``config`` (sliding-window layers where the config says)."""
    from transformers import DynamicCache

    if config is None:
        return DynamicCache()
    return DynamicCache(config=config)
