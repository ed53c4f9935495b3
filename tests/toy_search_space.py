"""The toy technique's search face (test-only): samples `factor`, one preset, a cost hook from the profile."""

from __future__ import annotations

from typing import Any

from search_spaces import Preset, SearchContext, SearchSpace, register_search_space
from tests.toy_policy import NAME


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


register_search_space(NormScaleSpace())
