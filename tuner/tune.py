"""`autotune tune`: profile -> search -> measure -> per-device policy YAML.

One loaded model serves the whole study: every trial applies a policy, is scored for quality against the
dense reference (computed once), is timed end to end, and is removed (bit-identical restore). The study
is multi-objective (the objective metric, the quality metric) with the quality budget as an Optuna
constraint; the policy written is the best feasible trial on the objective, or the best-effort trial
(least budget violation) flagged `objective.budget_met: false` when nothing met the budget.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from policies import apply_policy, model_fingerprint, policy_from_dict, policy_path, save_policy
from policies.schema import tool_version
from policies.store import model_slug
from profilers.device import DeviceFingerprint, resolve_device, torch_device
from search_spaces import SearchContext, SearchSpace, get_search_space
from tuner.measure import GenerationMeasurement, forwards_per_token, measure_generation
from tuner.models import LoadedModel, default_draft_head, default_draft_model, load_model
from tuner.quality import HIGHER_IS_BETTER, QUALITY_METRICS, QualityConfig, QualityHarness, quality_drop
from tuner.study import (
    CONSTRAINT_KEY,
    StudyConfigError,
    TrialOutcome,
    check_storage,
    make_sampler,
    open_study,
    pareto_front,
    run_trials,
    select_best,
)
from tuner.workload import TunerInputs, Workload, timing_input_ids

OBJECTIVES = {"ttft_ms": "minimize", "latency_ms": "minimize", "tokens_per_s": "maximize"}


@dataclass
class TuneConfig:
    """Everything `autotune tune` takes, with the CLI's defaults."""

    model: str = "builtin:tiny"
    techniques: tuple[str, ...] = ()
    budget: int | None = 20
    timeout_s: float | None = None
    quality_budget: float = 1.0
    quality_metric: str = "accuracy"
    objective: str = "latency_ms"
    device: str | None = None
    storage: str | None = None
    study_name: str | None = None
    out_dir: Path = Path("policies")
    sampler: str = "tpe"
    seed: int = 0
    workload: Workload = field(default_factory=Workload)
    quality: QualityConfig = field(default_factory=QualityConfig)
    repeats: int = 3
    show_progress: bool = False
    draft_model: str | None = None  # speculative decoding's draft model (default: the one known for the model)
    draft_head: str | None = None  # speculative decoding's EAGLE head (default: the one known for the model)
    trust_remote_code: bool = False  # run modelling code shipped in the checkpoint (LLaDA, Dream)


@dataclass
class TuneResult:
    policy_path: Path
    policy: dict[str, Any]
    artefacts_dir: Path
    best_trial: int | None
    budget_met: bool
    n_trials: int


def check_config(cfg: TuneConfig) -> list[SearchSpace]:
    """Validate user choices before any expensive work; raises ValueError naming the bad option."""
    if not cfg.techniques:
        raise ValueError("--techniques: name at least one technique")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"--objective {cfg.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if cfg.quality_metric not in QUALITY_METRICS:
        raise ValueError(f"--quality-metric {cfg.quality_metric!r}: choose one of {', '.join(QUALITY_METRICS)}")
    if not (cfg.quality_budget >= 0 and math.isfinite(cfg.quality_budget)):
        raise ValueError(f"--quality-budget must be a finite number >= 0, got {cfg.quality_budget}")
    if cfg.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {cfg.repeats}")
    if cfg.budget is not None and cfg.budget < 1:
        raise StudyConfigError(f"--budget must be a positive number of trials, got {cfg.budget}")
    if cfg.budget is None and cfg.timeout_s is None:
        raise StudyConfigError("give --budget or --timeout: an unbounded study never ends")
    make_sampler(cfg.sampler, cfg.seed)
    check_storage(cfg.storage)
    return [get_search_space(name) for name in cfg.techniques]


def check_model_kind(cfg: TuneConfig, model: Any) -> None:
    """Refuse techniques for another kind of model (a causal LM's token dropping on a denoiser, diffusion
    decoding on a causal LM) and metrics the model cannot be scored on, before any profiling."""
    from policies.model_kind import MASKED_DIFFUSION, kind_problems, model_kind

    problems = kind_problems(model, cfg.techniques)
    if problems:
        raise ValueError(f"--techniques {problems[0]}")
    if model_kind(model) == MASKED_DIFFUSION and cfg.quality_metric != "accuracy":
        raise ValueError(f"--quality-metric {cfg.quality_metric}: a masked-diffusion model is scored on accuracy only")


def _measured_dict(m: GenerationMeasurement, quality: float, metric: str,
                   forwards_per_token: float | None = None) -> dict[str, Any]:
    extra = {} if forwards_per_token is None else {"forwards_per_token_ratio": forwards_per_token}
    return {**extra, "ttft_ms": round(m.ttft_ms, 4), "latency_ms": round(m.latency_ms, 4),
            "tokens_per_s": round(m.tokens_per_s, 4),
            "peak_memory_mb": None if m.peak_memory_mb is None else round(m.peak_memory_mb, 3),
            "kv_cache_mb": None if m.kv_cache_mb is None else round(m.kv_cache_mb, 4),
            "quality": round(quality, 4), "quality_metric": metric}


def build_policy_dict(loaded: LoadedModel, device: DeviceFingerprint, workload: Workload, cfg: TuneConfig,
                      sections: dict[str, Any], measured: dict[str, Any] | None = None,
                      provenance: dict[str, Any] | None = None, budget_met: bool | None = None) -> dict[str, Any]:
    """The policy document for a set of technique sections (validated by `policy_from_dict`)."""
    objective: dict[str, Any] = {"metric": cfg.objective, "direction": OBJECTIVES[cfg.objective],
                                 "quality_metric": cfg.quality_metric, "quality_budget": cfg.quality_budget}
    if budget_met is not None:
        objective["budget_met"] = budget_met
    document: dict[str, Any] = {
        "schema_version": 1,
        "model": {"id": loaded.model_id, "fingerprint": model_fingerprint(loaded.model)},
        "device": device.to_dict(),
        "workload": workload.as_dict(),
        "objective": objective,
        "techniques": sections,
        "provenance": provenance or {"tool_version": tool_version(), "created_at": _now()},
    }
    if measured is not None:
        document["measured"] = measured
    return document


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def tune(cfg: TuneConfig, log: Any = None) -> TuneResult:
    """Run the whole pipeline for one device and write `DIR/<model-slug>/<device-id>.yaml`."""
    say = log or (lambda msg: None)
    spaces = check_config(cfg)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, torch_device(device), dtype=cfg.workload.dtype,
                        trust_remote_code=cfg.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_model_kind(cfg, model)
    fingerprint = model_fingerprint(model)
    target = policy_path(cfg.out_dir, loaded.model_id, device.id, cfg.workload.dtype)
    artefacts = target.with_suffix(".d")
    artefacts.mkdir(parents=True, exist_ok=True)

    curves = None
    if any(space.needs_layer_profile for space in spaces):
        say(f"profiling {loaded.model_id} on {device.id}")
        curves = _profile(model, device, cfg.workload, artefacts)
    # Cost hooks predict a latency: the objective itself, or end-to-end latency when the objective is tokens/s.
    cost_metric = cfg.objective if cfg.objective.endswith("_ms") else "latency_ms"
    ctx = SearchContext(model_fingerprint=fingerprint, workload=cfg.workload.as_dict(), device=device.to_dict(),
                        curves=curves, model_id=loaded.model_id,
                        draft_model=cfg.draft_model or default_draft_model(loaded.model_id),
                        draft_head=cfg.draft_head or default_draft_head(loaded.model_id), artefacts=artefacts,
                        objective=cost_metric, model=model, tokenizer=tokenizer, inputs=TunerInputs(cfg.quality))
    _prepare(spaces, ctx, model, tokenizer, torch_device(device), say)

    harness = QualityHarness(model, tokenizer, cfg.quality, cache_dir=artefacts,
                             model_key=json.dumps(fingerprint, sort_keys=True))
    reference = harness.reference()
    ref_quality = reference.metric(cfg.quality_metric)
    say(f"dense {cfg.quality_metric}: {ref_quality:.2f}")

    input_ids = timing_input_ids(tokenizer, cfg.workload.prompt_tokens, torch_device(device))
    with apply_policy(model, None) as dense:
        baseline = measure_generation(dense.generate, input_ids, cfg.workload.new_tokens, torch_device(device),
                                      warmup="auto", repeats=cfg.repeats, forward=dense)
        baseline_forwards = forwards_per_token(dense)
    say(f"dense {cfg.objective}: {getattr(baseline, cfg.objective):.2f}")
    # Lossless techniques only (speculative decoding): every trial must reproduce dense greedy output exactly.
    lossless = all(space.lossless for space in spaces)
    dense_ids = _greedy_ids(model, input_ids, cfg.workload.new_tokens) if lossless else None

    study_name = cfg.study_name or default_study_name(cfg, loaded.model_id, device.id)
    handle = open_study(study_name, cfg.storage, artefacts / "study.journal", sampler=cfg.sampler, seed=cfg.seed,
                        directions=(OBJECTIVES[cfg.objective],
                                    "maximize" if HIGHER_IS_BETTER[cfg.quality_metric] else "minimize"),
                        metric_names=(cfg.objective, cfg.quality_metric))
    # before the presets: a search space may price its study starts against dense
    ctx.baseline = _measured_dict(baseline, ref_quality, cfg.quality_metric, baseline_forwards)
    _enqueue_presets(handle, spaces, ctx)

    def evaluate(trial: Any) -> TrialOutcome:
        sections = {space.name: space.suggest(trial, ctx) for space in spaces}
        policy = policy_from_dict(build_policy_dict(loaded, device, cfg.workload, cfg, sections))
        predicted = _predict(spaces, sections, ctx, cost_metric)
        incumbent = _incumbent(handle.study, cfg)
        trusted = _cost_model_trusted(handle.study)
        if _ruled_out(predicted, incumbent, cfg, trusted):
            # Predicted slower than the best feasible trial: whatever its quality, it cannot be the policy, so
            # neither quality nor timing is spent on it.
            trial.set_user_attr("sections", sections)
            trial.set_user_attr("predicted_ms", predicted)
            raise optuna.TrialPruned(f"predicted {predicted:.1f} ms, over {1 + _rule_out_margin(trusted):.2f}x "
                                     f"the best feasible trial's {_rule_out_bar_ms(incumbent, cfg):.1f} ms")
        with apply_policy(model, policy) as tuned:
            if dense_ids is not None:
                # one greedy generation, before any quality work: a lossy bug fails the trial, never prunes it
                _check_greedy_output(tuned, input_ids, dense_ids)
            # Accuracy is scored example by example and stops once the budget is out of reach (an exact bound).
            # Should every trial stop so, the best effort is measured in full after the study (`_best_effort`).
            floor = ref_quality - cfg.quality_budget if cfg.quality_metric == "accuracy" else None
            quality = harness.evaluate(tuned.generate, tuned, stop_below=floor)
            if quality.stopped_early:
                if dense_ids is not None:
                    raise LosslessViolation("lossless guard: task answers fell below dense greedy accuracy")
                trial.set_user_attr("sections", sections)
                trial.set_user_attr("quality", quality.summary())
                # how far its estimated accuracy misses the budget: the sampler ranks stopped trials by it (the
                # exact bound is the same for every trial stopped at its first miss, so it cannot rank them); never
                # below the bound's miss, which is positive, so a stopped trial always counts as infeasible
                miss = max(quality_drop(cfg.quality_metric, ref_quality, acc) - cfg.quality_budget
                           for acc in (quality.accuracy, quality.estimated_accuracy))
                trial.set_constraint(CONSTRAINT_KEY, miss)
                raise optuna.TrialPruned(f"accuracy can reach at most {quality.accuracy:.1f} after "
                                         f"{quality.n_examples} examples; the budget needs {floor:.1f}")
            value = quality.metric(cfg.quality_metric)
            if dense_ids is not None:
                _check_same_answers(quality.predictions, reference.predictions)
            attrs: dict[str, Any] = {"sections": sections, "quality": quality.summary()}
            measured = measure_generation(tuned.generate, input_ids, cfg.workload.new_tokens,
                                          torch_device(device), warmup="auto", repeats=cfg.repeats, forward=tuned)
            attrs["measured"] = _measured_dict(measured, value, cfg.quality_metric, forwards_per_token(tuned))
            objective_value = getattr(measured, cfg.objective)
            if predicted is not None:
                attrs["predicted_ms"] = predicted
                actual = getattr(measured, cost_metric)
                attrs["prediction_error"] = (predicted - actual) / actual
        drop = quality_drop(cfg.quality_metric, ref_quality, value)
        return TrialOutcome(values=(objective_value, value), constraint=drop - cfg.quality_budget, user_attrs=attrs)

    def _best_effort(sections: dict[str, Any]) -> dict[str, Any]:
        """Quality on every example and a timing of `sections`: what a completed trial would have recorded."""
        policy = policy_from_dict(build_policy_dict(loaded, device, cfg.workload, cfg, sections))
        with apply_policy(model, policy) as tuned:
            value = harness.evaluate(tuned.generate, tuned).metric(cfg.quality_metric)
            measured = measure_generation(tuned.generate, input_ids, cfg.workload.new_tokens, torch_device(device),
                                          warmup="auto", repeats=cfg.repeats, forward=tuned)
            return {"sections": sections,
                    "measured": _measured_dict(measured, value, cfg.quality_metric, forwards_per_token(tuned))}

    run_trials(handle, evaluate, budget=cfg.budget, timeout_s=cfg.timeout_s, show_progress=cfg.show_progress)
    # Finished trials only: presets enqueued beyond the budget stay WAITING and are not part of the result.
    trials = [t for t in handle.study.get_trials(deepcopy=False) if t.state.is_finished()]
    best, met = select_best([t for t in trials if "measured" in t.user_attrs], 0, OBJECTIVES[cfg.objective])
    if best is not None:
        best_number, best_attrs = best.number, best.user_attrs
    else:
        pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and "quality" in t.user_attrs]
        if not pruned:
            raise RuntimeError(f"study {study_name!r} has no completed trial; see failed trials' autotune:error")
        # Every trial stopped short of the budget: the one whose partial accuracy reached furthest is the best
        # effort, scored on every example and timed now (a pruned trial has neither).
        chosen = max(pruned, key=lambda t: t.user_attrs["quality"].get("estimated_accuracy",
                                                                        t.user_attrs["quality"]["accuracy"]))
        say(f"no trial met the quality budget; measuring the best effort (trial {chosen.number}) in full")
        best_number, best_attrs, met = chosen.number, _best_effort(chosen.user_attrs["sections"]), False
    _save_trials(trials, handle.study.directions, artefacts, cfg)

    measured = {"baseline": _measured_dict(baseline, ref_quality, cfg.quality_metric, baseline_forwards),
                "tuned": best_attrs["measured"]}
    tuned_value, dense_value = measured["tuned"][cfg.objective], measured["baseline"][cfg.objective]
    if (tuned_value > dense_value) == (OBJECTIVES[cfg.objective] == "minimize"):
        say(f"warning: no trial beat dense on {cfg.objective} on this device ({tuned_value:.2f} vs dense "
            f"{dense_value:.2f}); the policy is written, but running dense is faster here")
    provenance = {"tool_version": tool_version(), "study": study_name, "storage": handle.storage_url,
                  "trial": best_number, "seed": cfg.seed, "sampler": cfg.sampler, "created_at": _now(),
                  "n_trials": len(trials)}
    errors = [abs(t.user_attrs["prediction_error"]) for t in trials if "prediction_error" in t.user_attrs]
    if errors:
        provenance["cost_model_median_abs_error"] = round(statistics.median(errors), 4)
        provenance["cost_model_measured_trials"] = len(errors)
    document = build_policy_dict(loaded, device, cfg.workload, cfg, best_attrs["sections"], measured,
                                 provenance, budget_met=met)
    policy = policy_from_dict(document)
    save_policy(policy, target)
    say(f"wrote {target} (trial {best_number}, budget {'met' if met else 'NOT met: best effort'})")
    return TuneResult(policy_path=target, policy=document, artefacts_dir=artefacts, best_trial=best_number,
                      budget_met=met, n_trials=len(trials))


def _prepare(spaces: list[SearchSpace], ctx: SearchContext, model: Any, tokenizer: Any, device: Any,
             say: Any) -> None:
    """Run each space's `prepare` once and keep what it measured in `ctx.prepared` under its name."""
    for space in spaces:
        say(f"profiling for {space.name}")
        state = space.prepare(ctx, model, tokenizer, device)
        if state is not None:
            ctx.prepared[space.name] = state


class LosslessViolation(RuntimeError):
    """A trial of a lossless technique changed the greedy output: a bug or numerics, never a trade-off."""


def _greedy_ids(model: Any, input_ids: Any, n: int) -> Any:
    import torch

    with torch.inference_mode():
        return model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones_like(input_ids), pad_token_id=0)


def _check_greedy_output(handle: Any, input_ids: Any, dense_ids: Any) -> None:
    """Fail the trial (raise) when its greedy output on the timing prompt differs from dense in any token."""
    import torch

    n = dense_ids.shape[1] - input_ids.shape[1]
    with torch.inference_mode():
        out = handle.generate(input_ids, max_new_tokens=n, min_new_tokens=n)
    if not torch.equal(out, dense_ids):
        differ = (out[0, :dense_ids.shape[1]] != dense_ids[0, :out.shape[1]]).nonzero()
        at = int(differ[0]) - input_ids.shape[1] if differ.numel() else min(out.shape[1], dense_ids.shape[1])
        raise LosslessViolation(f"lossless guard: greedy output differs from dense at generated token {at}")


def _check_same_answers(predictions: dict[str, list[str]], reference: dict[str, list[str]]) -> None:
    """Fail the trial (raise) when any task answer differs from dense greedy's."""
    for task, answers in reference.items():
        if predictions.get(task) != answers:
            raise LosslessViolation(f"lossless guard: task {task!r} answers differ from dense greedy")


def default_study_name(cfg: TuneConfig, model_id: str, device_id: str) -> str:
    """model--device--techniques--<digest of what the trials are scored on>.

    Trials are only comparable under the same workload, objective and quality settings, so a re-run that
    changes any of them starts a new study instead of resuming (and mixing into) the old one.
    """
    import hashlib

    settings = json.dumps({"workload": cfg.workload.as_dict(), "objective": cfg.objective,
                           "quality_metric": cfg.quality_metric, "quality_budget": cfg.quality_budget,
                           "quality": cfg.quality.key(), "repeats": cfg.repeats}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return f"{model_slug(model_id)}--{device_id}--{'+'.join(cfg.techniques)}--{digest}"


def _predict(spaces: list[SearchSpace], sections: dict[str, Any], ctx: SearchContext, objective: str) -> float | None:
    """The cost model's prediction of the objective (in ms), when exactly one technique has a cost hook.

    Each hook predicts the whole workload's latency under its own section; combining several techniques'
    predictions needs a joint model, which no technique provides yet, so then there is no prediction.
    """
    if not objective.endswith("_ms"):
        return None
    predictions = [p for p in (space.predict_ms(sections[space.name], ctx) for space in spaces) if p is not None]
    return float(predictions[0]) if len(predictions) == 1 else None


def _incumbent(study: Any, cfg: TuneConfig) -> Any:
    """The best measured feasible trial so far, or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "measured" in t.user_attrs]
    best, met = select_best(done, 0, OBJECTIVES[cfg.objective])
    return best if met else None


def _cost_model_trusted(study: Any, min_trials: int = 3, max_error: float = 0.15) -> bool:
    """Trust predictions only after they matched measurements in this very study (device, load, workload)."""
    errors = [abs(t.user_attrs["prediction_error"]) for t in study.get_trials(deepcopy=False)
              if "prediction_error" in t.user_attrs]
    return len(errors) >= min_trials and statistics.median(errors) <= max_error


#: A trial predicted this much slower than the best feasible one is not run once the cost model is trusted;
#: before that, only one predicted this much slower: on a real model a near-dense trial scored in full costs
#: minutes (SmolLM2: 16 examples at 2k tokens, about 4 min), and a calibrated prediction is not 50% off.
RULE_OUT_MARGIN = 0.10
UNTRUSTED_RULE_OUT_MARGIN = 0.50


def _rule_out_margin(trusted: bool) -> float:
    return RULE_OUT_MARGIN if trusted else UNTRUSTED_RULE_OUT_MARGIN


def _rule_out_bar_ms(incumbent: Any, cfg: TuneConfig) -> float | None:
    """The incumbent's time that a prediction is held against: its objective when that is a time; for tokens/s
    its measured latency of the same workload (the same new tokens, so a longer call decodes more slowly)."""
    if OBJECTIVES[cfg.objective] == "minimize":
        return float(incumbent.values[0])
    latency = (incumbent.user_attrs.get("measured") or {}).get("latency_ms")
    return None if latency is None else float(latency)


def _ruled_out(predicted: float | None, incumbent: Any, cfg: TuneConfig, trusted: bool) -> bool:
    """The cost model rules the trial out: predicted slower than the feasible incumbent by the margin."""
    if predicted is None or incumbent is None:
        return False
    bar = _rule_out_bar_ms(incumbent, cfg)
    return bar is not None and predicted > bar * (1 + _rule_out_margin(trusted))


#: Seconds one grid point of the study's profile may take: a real model's 2k-token prefill takes ~5 s on a
#: 2-core CPU, and 15 forwards per point at five repeats made profiling alone 5 minutes of a 15-minute study.
PROFILE_POINT_BUDGET_S = 5.0


def _profile(model: Any, device: DeviceFingerprint, workload: Workload, artefacts: Path) -> Any:
    from profilers.layer_profiler import profile_curves, save_curves

    n = workload.prompt_tokens
    # Down to 1/64 of the prompt: token-retention schedules keep as little as 2%, and below the grid a curve is
    # extrapolated linearly, which misses the fixed cost a layer has at a few tokens.
    grid = sorted({max(16, round(n * f)) for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)})
    curves = profile_curves(model, torch_device(device), prefill_tokens=tuple(grid), decode_kv_tokens=tuple(grid),
                            warmup=2, repeats=5, point_budget_s=PROFILE_POINT_BUDGET_S)
    save_curves(curves, artefacts / "profile.csv")
    return curves


def _enqueue_presets(handle: Any, spaces: list[SearchSpace], ctx: SearchContext) -> None:
    from tuner.study import enqueue_once

    params, attrs = [], []
    for space in spaces:
        for preset in space.presets(ctx):
            if preset.params is None:  # not expressible as trial parameters (shown by bench only)
                continue
            params.append(preset.params)
            attrs.append({"autotune:preset": f"{space.name}:{preset.name}"})
    if params:
        enqueue_once(handle, "autotune:presets_enqueued", params, attrs)


def _save_trials(trials: list[Any], directions: list[Any], artefacts: Path, cfg: TuneConfig) -> None:
    """Trials table (CSV) and the Pareto front (JSON) for `autotune report`."""
    import pandas as pd

    names = [d.name.lower() for d in directions]
    front = {t.number for t in pareto_front(trials, names)}
    rows = []
    for t in trials:
        measured = t.user_attrs.get("measured", {})
        row = {"number": t.number, "state": t.state.name, "ttft_ms": measured.get("ttft_ms"),
               "latency_ms": measured.get("latency_ms"), "tokens_per_s": measured.get("tokens_per_s"),
               "predicted_ms": t.user_attrs.get("predicted_ms"),
               "prediction_error": t.user_attrs.get("prediction_error"),
               "latency_source": t.user_attrs.get("latency_source"),
               "preset": t.user_attrs.get("autotune:preset"), "pareto": t.number in front,
               "feasible": (t.constraints or {}).get("quality_budget", 0) <= 0 if t.values else None,
               "kv_cache_mb": measured.get("kv_cache_mb"),
               "forwards_per_token": measured.get("forwards_per_token_ratio"),
               "error": t.user_attrs.get("autotune:error"),
               "params": json.dumps(t.params, sort_keys=True),
               "sections": json.dumps(t.user_attrs.get("sections"), sort_keys=True)}
        # The objective columns hold the study's values (measured, or predicted where timing was skipped).
        row[cfg.objective] = t.values[0] if t.values else None
        row[cfg.quality_metric] = t.values[1] if t.values else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    tmp = artefacts / "trials.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(artefacts / "trials.csv")
