"""The Optuna study wrapper: storage, sampler, a shared trial budget, failures and resumption.

Why an ask/tell loop instead of `study.optimize`: the trial budget is a property of the *study*, not of
one process. Several workers may share a study; the total number of trials they run must equal the budget
(none lost, none duplicated), and a worker that is killed and started again must carry on where the study
stands. So each worker, under a file lock next to the journal, counts the trials that consume budget and
asks for a new trial only if budget remains. Trials left RUNNING by a dead worker on this host are marked
failed (flagged stale, not counted) and their parameters re-enqueued so their work is done once.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("tpe", "gp", "random")
WORKER_ATTR = "autotune:worker"
STALE_ATTR = "autotune:stale"
ERROR_ATTR = "autotune:error"
RETRY_ATTR = "autotune:retry_of"
CONSTRAINT_KEY = "quality_budget"


class StudyConfigError(ValueError):
    """Bad sampler, storage URL or budget: a user input problem."""


@dataclass
class TrialOutcome:
    """What an evaluated trial reports: objective values, budget constraint (<= 0 feasible), user attributes."""

    values: Sequence[float]
    constraint: float | None = None
    user_attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyHandle:
    """An opened study plus what is needed to share its budget safely."""

    study: optuna.Study
    storage_url: str
    lock_path: Path | None


# -- construction -------------------------------------------------------------------------------
def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """TPE (Optuna 5's default: multivariate + constant liar), GP (Bayesian optimisation) or random."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _is_journal(storage: str | None) -> bool:
    return storage is None or storage.startswith("journal:") or storage.endswith(".journal")


def check_storage(storage: str | None) -> None:
    """Reject a --storage value that is neither a journal file nor a database URL (before any work)."""
    if not _is_journal(storage) and "://" not in str(storage):
        raise StudyConfigError(f"--storage {storage!r}: expected a journal file (*.journal, journal:PATH) or a "
                               "database URL such as postgresql://user@host/db")


def make_storage(storage: str | None, default_journal: Path) -> tuple[Any, str, Path | None]:
    """Build the Optuna storage. Returns (storage, url-for-provenance, budget-lock-path or None).

    Default: a journal file (safe for several local processes). `journal:PATH` or a `*.journal` path
    selects another journal file; any other value is an RDB URL (PostgreSQL/MySQL for many machines,
    with heartbeats so that dead workers' trials are failed). SQLite works for one process only.
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    check_storage(storage)
    if _is_journal(storage):
        path = default_journal if storage is None else Path(storage.removeprefix("journal:").removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return JournalStorage(backend), f"journal:{path}", path.with_name(path.name + ".budget.lock")
    assert storage is not None
    if storage.startswith("sqlite"):
        warnings.warn("SQLite storage is not safe for parallel workers ('database is locked'); use the "
                      "default journal file or PostgreSQL", stacklevel=2)
        return RDBStorage(storage), storage, None
    try:
        return RDBStorage(storage, heartbeat_interval=30, grace_period=120,
                          failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1)), storage, None
    except Exception as exc:  # driver missing, server down: the user's URL is the problem to name
        raise StudyConfigError(f"--storage {storage!r}: cannot open ({str(exc).splitlines()[0]})") from exc


def open_study(name: str, storage: str | None, default_journal: Path, sampler: str = "tpe",
               seed: int | None = 0, directions: Sequence[str] = ("minimize", "maximize"),
               metric_names: Sequence[str] | None = None) -> StudyHandle:
    """Create the study or load it if it exists (resume), with the requested sampler."""
    built, url, lock = make_storage(storage, default_journal)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar and log lines say what matters
    study = optuna.create_study(storage=built, study_name=name, sampler=make_sampler(sampler, seed),
                                directions=list(directions), load_if_exists=True)
    if metric_names and not study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
    return StudyHandle(study=study, storage_url=url, lock_path=lock)


# -- budget, locking and stale trials ----------------------------------------------------------------
@contextlib.contextmanager
def _budget_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _process_start_ticks(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _worker_tag() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start_ticks(pid) or '?'}"


def _worker_is_dead(tag: str) -> bool:
    """True only when the worker ran on this host and its process (pid + start time) is gone."""
    try:
        host, pid, ticks = tag.rsplit(":", 2)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    current = _process_start_ticks(int(pid))
    return current is None or (ticks != "?" and current != ticks)


def counts_against_budget(trial: FrozenTrial) -> bool:
    """Trials that used (or are using) budget: finished or running, but not stale ones re-enqueued."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(STALE_ATTR, False)


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker died on this host and re-enqueue their parameters."""
    recovered = []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = trial.user_attrs.get(WORKER_ATTR)
        if tag is None or not _worker_is_dead(tag):
            continue
        storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
        if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number}, skip_if_exists=False)
            recovered.append(trial.number)
    if hasattr(storage, "is_heartbeat_enabled") and storage.is_heartbeat_enabled():
        optuna.storages.fail_stale_trials(study)
    return recovered


def enqueue_once(handle: StudyHandle, flag: str, params_list: Sequence[dict[str, Any]],
                 attrs_list: Sequence[dict[str, Any]] | None = None) -> bool:
    """Enqueue parameter sets (paper presets) exactly once per study, even with several workers."""
    with _budget_lock(handle.lock_path):
        if handle.study.user_attrs.get(flag):
            return False
        for i, params in enumerate(params_list):
            attrs = attrs_list[i] if attrs_list else None
            handle.study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)
        handle.study.set_user_attr(flag, True)
    return True


class _Heartbeat:
    """Records heartbeats for RDB storages during ask/tell (study.optimize would do it for us)."""

    def __init__(self, storage: Any, trial_id: int):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if hasattr(storage, "is_heartbeat_enabled") and storage.is_heartbeat_enabled():
            interval = storage.get_heartbeat_interval()
            storage.record_heartbeat(trial_id)

            def beat() -> None:
                while not self._stop.wait(interval):
                    storage.record_heartbeat(trial_id)

            self._thread = threading.Thread(target=beat, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class RunSummary:
    """What this worker did in this call."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    pruned: int = 0
    recovered: list[int] = field(default_factory=list)


def run_trials(handle: StudyHandle, evaluate: Callable[[optuna.Trial], TrialOutcome], budget: int | None,
               timeout_s: float | None = None, show_progress: bool = False,
               on_trial_end: Callable[[FrozenTrial], None] | None = None) -> RunSummary:
    """Run trials until the study-wide budget is used or the timeout passes.

    A trial whose evaluation raises ``optuna.TrialPruned`` is recorded as PRUNED (it counts against the budget);
    a trial whose evaluation raises anything else (including out-of-memory) is recorded as FAIL with its error message
    and the study goes on; Ctrl-C fails the trial in flight and propagates.
    """
    if budget is None and timeout_s is None:
        raise StudyConfigError("give --budget or --timeout: an unbounded study never ends")
    if budget is not None and budget < 1:
        raise StudyConfigError(f"--budget must be a positive number of trials, got {budget}")
    study = handle.study
    summary = RunSummary()
    with _budget_lock(handle.lock_path):
        summary.recovered = recover_stale_trials(study)
    progress = _progress_bar(study, budget, show_progress)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while deadline is None or time.monotonic() < deadline:
            with _budget_lock(handle.lock_path):
                used = sum(counts_against_budget(t) for t in study.get_trials(deepcopy=False))
                if budget is not None and used >= budget:
                    break
                trial = study.ask()
                trial.set_user_attr(WORKER_ATTR, _worker_tag())
            summary.started += 1
            heartbeat = _Heartbeat(study._storage, trial._trial_id)
            try:
                outcome = evaluate(trial)
                if outcome.constraint is not None:
                    trial.set_constraint(CONSTRAINT_KEY, outcome.constraint)
                for key, value in outcome.user_attrs.items():
                    trial.set_user_attr(key, value)
                values = list(outcome.values)
                if any(not math.isfinite(v) for v in values):
                    raise ValueError(f"objective returned non-finite values {values}")
            except KeyboardInterrupt:
                heartbeat.stop()
                study.tell(trial, state=TrialState.FAIL)
                raise
            except optuna.TrialPruned as exc:  # stopped early: it could no longer meet the budget
                heartbeat.stop()
                trial.set_user_attr("autotune:pruned", str(exc)[:500])
                frozen = study.tell(trial, state=TrialState.PRUNED)
                summary.pruned += 1
            except Exception as exc:  # noqa: BLE001 - any trial failure is recorded, the study goes on
                heartbeat.stop()
                message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                trial.set_user_attr(ERROR_ATTR, message[:500])
                frozen = study.tell(trial, state=TrialState.FAIL)
                summary.failed += 1
            else:
                heartbeat.stop()
                frozen = study.tell(trial, values)
                summary.completed += 1
            if progress is not None:
                progress.update(1)
            if on_trial_end is not None:
                on_trial_end(frozen)
    finally:
        if progress is not None:
            progress.close()
    return summary


def _progress_bar(study: optuna.Study, budget: int | None, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    done = sum(counts_against_budget(t) for t in study.get_trials(deepcopy=False))
    return tqdm(total=budget, initial=min(done, budget or done), desc=f"study {study.study_name}", unit="trial")


# -- results ------------------------------------------------------------------------------------
def trial_constraint(trial: FrozenTrial) -> float | None:
    constraints = getattr(trial, "constraints", None) or {}
    if isinstance(constraints, dict):
        return constraints.get(CONSTRAINT_KEY)
    return max(constraints) if constraints else None


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """Non-dominated COMPLETE trials over all objectives (feasible or not: the trade-off is the point)."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        pa = [s * v for s, v in zip(signs, a.values, strict=True)]
        pb = [s * v for s, v in zip(signs, b.values, strict=True)]
        return all(x <= y for x, y in zip(pa, pb, strict=True)) and any(x < y for x, y in zip(pa, pb, strict=True))

    return [t for t in done if not any(dominates(o, t) for o in done if o is not t)]


def select_best(trials: Sequence[FrozenTrial], objective_index: int = 0, direction: str = "minimize"
                ) -> tuple[FrozenTrial | None, bool]:
    """Best trial on one objective among feasible ones; else best-effort (least violation). -> (trial, met)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if not done:
        return None, False
    sign = 1.0 if direction == "minimize" else -1.0
    feasible = [t for t in done if (trial_constraint(t) is None or trial_constraint(t) <= 0)]
    if feasible:
        return min(feasible, key=lambda t: (sign * t.values[objective_index], t.number)), True
    return min(done, key=lambda t: (trial_constraint(t), sign * t.values[objective_index], t.number)), False
