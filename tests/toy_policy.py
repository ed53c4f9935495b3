"""The toy technique's runtime face (test-only): `norm_scale` multiplies the final norm's weight by `factor`.

Lossy for factor != 1; `remove()` restores the saved weight. With `tests/toy_search_space.py` and one line in
the technique table (`tests/toy_technique.py`) it is a whole plug-in: the contract test runs over it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from policies.config import Number, TechniqueConfig, required
from policies.registry import FunctionHandle, TechniqueRuntime, register_runtime
from profilers.model_parts import decoder_parts

NAME = "norm_scale"


@dataclass(frozen=True, kw_only=True)
class NormScaleConfig(TechniqueConfig):
    technique: ClassVar[str] = NAME
    description: ClassVar[str] = "Test-only: scale the final norm's weight."

    factor: float = required(Number(gt=0, le=2), "multiplier of the final norm's weight")


class NormScaleRuntime(TechniqueRuntime):
    name = NAME
    config_class = NormScaleConfig

    def apply(self, model: Any, config: NormScaleConfig | dict[str, Any]) -> FunctionHandle:
        config = self.config_of(config)
        norm = decoder_parts(model).norm
        saved = norm.weight.detach().clone()
        norm.weight.data.mul_(float(config.factor))

        def undo() -> None:
            norm.weight.data.copy_(saved)

        return FunctionHandle(undo)


register_runtime(NormScaleRuntime())
