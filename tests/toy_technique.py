"""A small but real technique used only by the tests to drive the tuning pipeline end to end.

`norm_scale` multiplies the final norm's weight by `factor` (lossy for factor != 1) and restores the
saved original on remove(). It exercises every plug-in face: a runtime registered in `policies`, a
search space with a preset, a cost hook reading the device profile.
"""

from __future__ import annotations

from typing import Any

from policies.registry import FunctionHandle, TechniqueRuntime, register_runtime, registered_runtimes
from profilers.model_parts import decoder_parts
from search_spaces import Preset, SearchContext, SearchSpace, register_search_space

NAME = "norm_scale"


class NormScaleRuntime(TechniqueRuntime):
    name = NAME

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        factor = section.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 2:
            return [f"{path}.factor: must be a number in (0, 2], got {factor!r}"]
        return []

    def apply(self, model: Any, section: dict[str, Any]) -> FunctionHandle:
        norm = decoder_parts(model).norm
        saved = norm.weight.detach().clone()
        norm.weight.data.mul_(float(section["factor"]))

        def undo() -> None:
            norm.weight.data.copy_(saved)

        return FunctionHandle(undo)


class NormScaleSpace(SearchSpace):
    name = NAME

    def suggest(self, trial: Any, ctx: SearchContext) -> dict[str, Any]:
        return {"factor": trial.suggest_float("norm_scale.factor", 0.2, 1.0)}

    def presets(self, ctx: SearchContext) -> list[Preset]:
        return [Preset("identity", {"norm_scale.factor": 1.0}, {"factor": 1.0}, "no-op")]

    def predict_ms(self, section: dict[str, Any], ctx: SearchContext) -> float | None:
        if ctx.curves is None:
            return None
        prefill = ctx.curves[ctx.curves["mode"] == "prefill"]
        largest = prefill[prefill["n_query_tokens"] == prefill["n_query_tokens"].max()]
        return float(largest["latency_ms"].sum())


def register() -> None:
    if NAME not in registered_runtimes():
        register_runtime(NormScaleRuntime())
    register_search_space(NormScaleSpace())
