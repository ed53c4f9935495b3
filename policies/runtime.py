"""``apply_policy``: put a policy's techniques on a model, and take them off again exactly.

Order of application (documented contract): techniques are applied sorted by ``(runtime.order,
runtime.name)`` — weight/structure edits first, forward hooks next, the decode-loop owner last (see
``policies.registry.DEFAULT_ORDER``) — never in the order sections happen to appear in a file. They are
removed in the reverse order, so each technique undoes its change on exactly the model it modified.

The handle is deliberately thin: with no technique, ``handle.generate`` is one ``model.generate`` call
with ``do_sample=False`` added, so a dense policy costs nothing measurable
(``benchmarks/bench_handle_overhead.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies.fingerprint import fingerprint_mismatches, model_fingerprint
from policies.model_kind import kind_problems, model_kind
from policies.registry import DecodeStats, TechniqueHandle, get_runtime, runtime_order
from policies.schema import Policy, PolicyError, policy_from_dict, validate_techniques

__all__ = ["PolicyHandle", "apply_policy"]


class PolicyHandle:
    """A policy applied to a model. Use as a context manager or call ``remove()`` yourself.

    Attributes:
        model: the (modified) model.
        policy: the applied policy, or None for the dense no-op handle.
        techniques: names of the applied techniques, in application order.
    """

    def __init__(self, model: Any, policy: Policy | None, handles: list[tuple[str, TechniqueHandle]]) -> None:
        self.model = model
        self.policy = policy
        self._handles = handles
        self._generator: TechniqueHandle | None = next(
            (h for _, h in handles if getattr(h, "owns_generate", False)), None
        )
        self._removed = False
        if self._generator is None and model_kind(model) == "masked-diffusion":
            # a denoiser has no `model.generate`: its dense decode is the baseline diffusion loop (one token per
            # forward), which reports its forwards like any decode-loop owner
            from policies.diffusion_blocks import baseline_handle

            self._generator = baseline_handle(model)

    @property
    def techniques(self) -> list[str]:
        return [name for name, _ in self._handles]

    @property
    def decode_owner(self) -> TechniqueHandle | None:
        """The technique handle that owns the decode loop (e.g. speculative decoding, whose `last_stats`
        report accepted tokens per step), or None."""
        return self._generator

    @property
    def last_stats(self) -> DecodeStats | None:
        """What the decode-loop owner's latest ``generate`` did (``DecodeStats.to_dict()``), or None when the
        model's own ``generate`` ran."""
        return None if self._generator is None else self._generator.last_stats

    @property
    def active(self) -> bool:
        """False once ``remove()`` ran."""
        return not self._removed

    def generate(self, input_ids: Any = None, **kwargs: Any) -> Any:
        """Generate with the policy in effect. Greedy unless ``do_sample`` is passed; every other
        keyword (``max_new_tokens``, ``attention_mask``, ``eos_token_id``, ``pad_token_id`` ...) goes
        through unchanged to ``model.generate`` or to the technique that owns the decode loop."""
        if self._removed:
            raise RuntimeError("this policy handle was removed; apply the policy again to generate with it")
        kwargs.setdefault("do_sample", False)
        if self._generator is not None:
            return self._generator.generate(self.model, input_ids, **kwargs)
        if input_ids is None:
            return self.model.generate(**kwargs)
        return self.model.generate(input_ids, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass of the modified model (e.g. logits for quality evaluation)."""
        return self.model(*args, **kwargs)

    def remove(self) -> None:
        """Undo every technique, last applied first. Idempotent. If one removal fails the others still
        run, then the first failure is raised (the model may then not be exactly restored)."""
        if self._removed:
            return
        self._removed = True
        first_error: BaseException | None = None
        for _name, handle in reversed(self._handles):
            try:
                handle.remove()
            except BaseException as exc:  # keep restoring the rest; report the first failure
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if not self._removed else "removed"
        names = ", ".join(self.techniques) or "dense"
        return f"<PolicyHandle {names} ({state})>"


def apply_policy(model: Any, policy: Policy | Mapping[str, Any] | None) -> PolicyHandle:
    """Apply ``policy`` to ``model`` in place and return the handle that undoes it.

    ``policy=None`` (what ``load_policy`` returns when nothing fits) gives a no-op dense handle, so
    calling code needs no special case. A policy for another model (fingerprint mismatch, dtype aside)
    or with invalid technique sections is refused with ``PolicyError`` before anything is touched. If a
    technique fails to apply, the ones already applied are removed before the error propagates.
    """
    if policy is None:
        return PolicyHandle(model, None, [])
    if isinstance(policy, Mapping):
        policy = policy_from_dict(dict(policy))
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy, a mapping or None, got {type(policy).__name__}")

    wrong_kind = kind_problems(model, policy.techniques)
    if wrong_kind:
        raise PolicyError([f"techniques.{problem}" for problem in wrong_kind], policy.source)
    mismatches = fingerprint_mismatches(policy.model.fingerprint, model_fingerprint(model))
    if mismatches:
        raise PolicyError(f"policy is for another model: {', '.join(mismatches)}", policy.source)
    problems = validate_techniques(policy.techniques)
    if problems:
        raise PolicyError(problems, policy.source)

    runtimes = sorted((get_runtime(name) for name in policy.techniques), key=runtime_order)
    applied: list[tuple[str, TechniqueHandle]] = []
    try:
        for runtime in runtimes:
            handle = runtime.apply(model, policy.techniques[runtime.name])
            if not callable(getattr(handle, "remove", None)):
                raise TypeError(f"technique {runtime.name!r}: apply() must return a TechniqueHandle")
            applied.append((runtime.name, handle))
        owners = [name for name, h in applied if getattr(h, "owns_generate", False)]
        if len(owners) > 1:
            raise PolicyError(f"techniques: at most one technique may own the decode loop, got {', '.join(owners)}")
    except BaseException as exc:
        for name, handle in reversed(applied):
            try:
                handle.remove()
            except Exception as undo_exc:  # report, but let the original error win
                note = f"while rolling back, removing {name!r} failed too: {type(undo_exc).__name__}: {undo_exc}"
                if hasattr(exc, "add_note"):
                    exc.add_note(note)
        raise
    return PolicyHandle(model, policy, applied)
