"""A worker process for the multi-process study tests: a cheap deterministic objective on a journal study.

Each evaluation appends `trial_number x` to a log file so that the test can check every trial ran once.
If the environment names a trial number in HANG_ON_TRIAL, the worker blocks on that trial (to be killed).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tuner.study import TrialOutcome, open_study, run_trials


def main() -> None:
    journal, log, budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    hang_on = int(os.environ.get("HANG_ON_TRIAL", "-1"))
    handle = open_study("shared", None, journal, sampler="random", seed=None)

    def evaluate(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == hang_on:
            (log.parent / "hanging").write_text(str(trial.number))
            time.sleep(600)
        time.sleep(0.05)
        with open(log, "a") as fh:
            fh.write(f"{trial.number} {x!r}\n")
        return TrialOutcome(values=(x, 1.0 - x), constraint=x - 0.5)

    run_trials(handle, evaluate, budget=budget)


if __name__ == "__main__":
    main()
