"""The study wrapper: shared budget across processes, resume after a killed worker, failures recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tuner.study import (
    STALE_ATTR,
    StudyConfigError,
    TrialOutcome,
    make_sampler,
    open_study,
    pareto_front,
    run_trials,
    select_best,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(REPO / "tests" / "study_worker.py")]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    return env


def _load(journal: Path) -> optuna.Study:
    return open_study("shared", None, journal, sampler="random").study


def test_two_processes_share_the_budget_exactly(tmp_path: Path) -> None:
    journal, log = tmp_path / "s.journal", tmp_path / "evals.log"
    procs = [subprocess.Popen([*WORKER, str(journal), str(log), "12"], env=_env()) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    trials = _load(journal).trials
    assert len(trials) == 12
    assert all(t.state == TrialState.COMPLETE for t in trials)
    evaluated = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert sorted(evaluated) == list(range(12))  # each trial evaluated exactly once
    workers = {t.user_attrs["autotune:worker"] for t in trials}
    assert len(workers) == 2  # both processes did work


def test_killed_worker_resumes_and_redoes_the_lost_trial(tmp_path: Path) -> None:
    journal, log = tmp_path / "s.journal", tmp_path / "evals.log"
    proc = subprocess.Popen([*WORKER, str(journal), str(log), "6"], env=_env(HANG_ON_TRIAL="2"))
    deadline = time.monotonic() + 60
    while not (tmp_path / "hanging").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state for t in _load(journal).trials][-1] == TrialState.RUNNING
    subprocess.run([*WORKER, str(journal), str(log), "6"], env=_env(), check=True, timeout=120)
    trials = _load(journal).trials
    stale = [t for t in trials if t.user_attrs.get(STALE_ATTR)]
    assert [t.number for t in stale] == [2] and stale[0].state == TrialState.FAIL
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6  # the budget is met by completed trials; the stale one does not count
    retry = [t for t in done if t.user_attrs.get("autotune:retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == stale[0].params


def test_failing_trials_are_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    handle = open_study("s", None, tmp_path / "s.journal", sampler="tpe", seed=0)

    def evaluate(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number % 2 == 0:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return TrialOutcome(values=(x, x), constraint=0.0)

    summary = run_trials(handle, evaluate, budget=6)
    assert (summary.completed, summary.failed) == (3, 3)
    failed = [t for t in handle.study.trials if t.state == TrialState.FAIL]
    assert failed[0].user_attrs["autotune:error"] == "RuntimeError: CUDA out of memory (simulated)"


def test_resume_in_process_respects_budget(tmp_path: Path) -> None:
    def evaluate(trial):
        return TrialOutcome(values=(trial.suggest_float("x", 0, 1), 0.0))

    for _ in range(2):
        handle = open_study("s", None, tmp_path / "s.journal", sampler="gp", seed=0)
        run_trials(handle, evaluate, budget=4)
    assert len(handle.study.trials) == 4


def test_best_feasible_and_best_effort_selection(tmp_path: Path) -> None:
    handle = open_study("s", None, tmp_path / "s.journal", sampler="random", seed=1)
    points = iter([(5.0, 90.0, 1.0), (3.0, 80.0, 2.0), (8.0, 99.0, -1.0), (9.0, 99.5, -2.0)])

    def evaluate(trial):
        trial.suggest_float("x", 0, 1)
        latency, quality, constraint = next(points)
        return TrialOutcome(values=(latency, quality), constraint=constraint)

    run_trials(handle, evaluate, budget=4)
    best, met = select_best(handle.study.trials)
    assert met and best.values[0] == 8.0
    front = pareto_front(handle.study.trials, ("minimize", "maximize"))
    assert sorted(t.values[0] for t in front) == [3.0, 5.0, 8.0, 9.0]
    infeasible = [t for t in handle.study.trials if t.values[0] in (5.0, 3.0)]
    best, met = select_best(infeasible)
    assert not met and best.values[0] == 5.0  # least violation wins when nothing meets the budget


def test_bad_inputs_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(StudyConfigError, match="unknown sampler 'cma'"):
        make_sampler("cma", 0)
    with pytest.raises(StudyConfigError, match="--storage"):
        open_study("s", "not-a-url", tmp_path / "x.journal")
    handle = open_study("s", None, tmp_path / "s.journal")
    with pytest.raises(StudyConfigError, match="--budget or --timeout"):
        run_trials(handle, lambda t: TrialOutcome(values=(0, 0)), budget=None)


def test_pruned_trials_are_recorded_as_pruned_and_count_against_the_budget(tmp_path: Path) -> None:
    handle = open_study("s", None, tmp_path / "s.journal", sampler="random", seed=0)

    def evaluate(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number % 3 == 0:
            raise optuna.TrialPruned("accuracy can reach at most 40.0")
        return TrialOutcome(values=(x, x), constraint=0.0)

    summary = run_trials(handle, evaluate, budget=6)
    assert (summary.completed, summary.pruned, summary.failed) == (4, 2, 0)
    pruned = [t for t in handle.study.trials if t.state == TrialState.PRUNED]
    assert [t.number for t in pruned] == [0, 3]
    assert pruned[0].user_attrs["autotune:pruned"] == "accuracy can reach at most 40.0"
