"""A trial whose accuracy can no longer meet the budget stops early, is recorded as pruned and is not timed."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import search_spaces
from policies import registry
from policies.config import Choice, TechniqueConfig, required
from policies.registry import FunctionHandle, TechniqueRuntime
from search_spaces import Preset, SearchSpace
from tuner.cli import main

NAME = "answer_breaker"


@dataclass(frozen=True, kw_only=True)
class BreakerConfig(TechniqueConfig):
    technique: ClassVar[str] = NAME
    mode: str = required(Choice(("off", "on")), "on: the LM head always predicts token 5")


class BreakerRuntime(TechniqueRuntime):
    name = NAME
    config_class = BreakerConfig

    def apply(self, model: Any, config: Any) -> FunctionHandle:
        config = self.config_of(config)
        if config.mode == "off":
            return FunctionHandle(lambda: None)

        def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            forced = torch.full_like(out, -1e4)
            forced[..., 5] = 0.0
            return forced

        return FunctionHandle(model.get_output_embeddings().register_forward_hook(hook).remove)


class BreakerSpace(SearchSpace):
    name = NAME

    def suggest(self, trial: Any, ctx: Any) -> dict[str, Any]:
        return {"mode": trial.suggest_categorical("answer_breaker.mode", ["off", "on"])}

    def presets(self, ctx: Any) -> list[Preset]:
        return [Preset("off", {"answer_breaker.mode": "off"}, {"mode": "off"})]


@pytest.fixture
def breaker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._RUNTIMES._items, NAME, BreakerRuntime())
    monkeypatch.setitem(search_spaces._SPACES._items, NAME, BreakerSpace())


def test_out_of_reach_trials_are_pruned_and_never_timed(breaker: None, tmp_path: Path, capsys) -> None:
    code = main(["tune", "--model", "builtin:tiny", "--techniques", NAME, "--budget", "5", "--out", str(tmp_path),
                 "--quality-budget", "10", "--prompt-tokens", "64", "--new-tokens", "2", "--repeats", "1",
                 "--examples", "4", "--tasks", "pattern", "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(next(tmp_path.glob("*/*.d/trials.csv")).open()))
    states = {r["number"]: r["state"] for r in rows}
    modes = {r["number"]: r["sections"] for r in rows}
    assert len(rows) == 5 and states["0"] == "COMPLETE"  # the preset ("off") is measured first: feasible
    pruned = [n for n, s in states.items() if s == "PRUNED"]
    assert pruned, states
    assert all("'on'" in modes[n] or '"on"' in modes[n] for n in pruned)
    assert all(s == "COMPLETE" for n, s in states.items() if "on" not in modes[n].replace("mode", ""))
    assert all(not r["latency_ms"] for r in rows if r["state"] == "PRUNED")  # never timed


class AlwaysBrokenSpace(BreakerSpace):
    def suggest(self, trial: Any, ctx: Any) -> dict[str, Any]:
        return {"mode": trial.suggest_categorical("answer_breaker.mode", ["on"])}

    def presets(self, ctx: Any) -> list[Preset]:
        return []


def test_when_every_trial_is_pruned_the_best_effort_is_measured_in_full(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(registry._RUNTIMES._items, NAME, BreakerRuntime())
    monkeypatch.setitem(search_spaces._SPACES._items, NAME, AlwaysBrokenSpace())
    code = main(["tune", "--model", "builtin:tiny", "--techniques", NAME, "--budget", "2", "--out", str(tmp_path),
                 "--quality-budget", "10", "--prompt-tokens", "64", "--new-tokens", "2", "--repeats", "1",
                 "--examples", "4", "--tasks", "pattern", "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(next(tmp_path.glob("*/*.d/trials.csv")).open()))
    assert [r["state"] for r in rows] == ["PRUNED", "PRUNED"]
    assert summary["budget_met"] is False
    tuned = summary["measured"]["tuned"]
    assert tuned["quality"] == 0.0 and tuned["latency_ms"] > 0  # scored on all 4 examples and timed
    assert summary["techniques"] == {NAME: {"mode": "on"}}


def test_the_cost_model_rules_out_by_a_wider_margin_until_it_is_trusted():
    from types import SimpleNamespace

    from tuner.tune import RULE_OUT_MARGIN, UNTRUSTED_RULE_OUT_MARGIN, _ruled_out

    cfg = SimpleNamespace(objective="latency_ms")
    incumbent = SimpleNamespace(values=(100.0, 90.0))
    just_over = 100.0 * (1 + RULE_OUT_MARGIN) + 1
    assert _ruled_out(just_over, incumbent, cfg, trusted=True)
    assert not _ruled_out(just_over, incumbent, cfg, trusted=False)
    assert _ruled_out(100.0 * (1 + UNTRUSTED_RULE_OUT_MARGIN) + 1, incumbent, cfg, trusted=False)
    assert not _ruled_out(None, incumbent, cfg, trusted=True)  # no prediction, no incumbent: never
    assert not _ruled_out(1e9, None, cfg, trusted=True)
    # tokens/s: held against the incumbent's measured latency of the same workload
    per_s = SimpleNamespace(objective="tokens_per_s")
    fast = SimpleNamespace(values=(12.0, 100.0), user_attrs={"measured": {"latency_ms": 200.0}})
    assert _ruled_out(200.0 * (1 + UNTRUSTED_RULE_OUT_MARGIN) + 1, fast, per_s, trusted=False)
    assert not _ruled_out(200.0 * (1 + UNTRUSTED_RULE_OUT_MARGIN) - 1, fast, per_s, trusted=False)
    assert not _ruled_out(1e9, SimpleNamespace(values=(12.0, 100.0), user_attrs={}), per_s, trusted=True)
