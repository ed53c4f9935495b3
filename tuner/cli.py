"""The `autotune` command line.

Exit codes are a contract: 0 ok, 2 bad input (one line naming the problem, no traceback), 1 runtime
failure (one line; `AUTOTUNE_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage on errors; our contract is one line naming the problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"autotune: error: {message} (see `{self.prog} --help`)\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, (tuple, list)) and len(v) == 2:  # an interval
            return f"{v[0]:.1f}-{v[1]:.1f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace) -> int:
    from profilers.device import list_devices

    devices = [d.to_dict() for d in list_devices()]
    if args.json:
        _print_json(devices)
    else:
        print(_table(devices, ["id", "kind", "name"]))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from tuner.builtin import BUILTIN_MODELS

    rows = [{"model": f"builtin:{name}", "kind": spec.kind, "description": spec.description}
            for name, spec in sorted(BUILTIN_MODELS.items())]
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, ["model", "kind", "description"]))
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from profilers.device import resolve_device, torch_device
    from profilers.layer_profiler import profile_curves, profile_model, save_curves
    from tuner.models import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.model, torch_device(device), dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    profile = profile_model(loaded.model, torch_device(device), mode=args.mode, n_tokens=args.tokens,
                            warmup=args.warmup, repeats=args.repeats,
                            logits_to_keep=1 if args.mode == "prefill" else None)  # as generate's prefill
    document = profile.to_json_dict(device.to_dict(), loaded.model_id)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "profile.json", json.dumps(document, indent=2, default=str))
        grid = sorted({max(16, args.tokens // 4), max(16, args.tokens // 2), args.tokens})
        curves = profile_curves(loaded.model, torch_device(device), prefill_tokens=tuple(grid),
                                decode_kv_tokens=tuple(grid), warmup=1, repeats=max(3, args.repeats // 2))
        save_curves(curves, out / "curves.csv")
        _say(f"wrote {out / 'profile.json'} and {out / 'curves.csv'} ({len(curves)} rows)")
    if args.json:
        _print_json(document)
    else:
        print(f"{loaded.model_id} on {device.id}, {args.mode}, {args.tokens} tokens")
        print(_table(document["layers"], ["index", "name", "latency_ms", "memory_mb"]))
        print(f"sum of parts {document['total_latency_ms']:.3f} ms; whole forward "
              f"{document.get('unhooked_latency_ms', float('nan')):.3f} ms; hook overhead "
              f"{document.get('hook_overhead_pct', float('nan')):.1f}%")
    return EXIT_OK


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _techniques(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(t.strip() for t in (getattr(args, "techniques", None) or "").split(",") if t.strip())


def _workload(args: argparse.Namespace) -> Any:
    from tuner.models import canonical_dtype, workload_defaults
    from tuner.workload import Workload

    defaults = workload_defaults(args.model, _techniques(args))
    return Workload(prompt_tokens=_given(args.prompt_tokens, defaults.prompt_tokens),
                    new_tokens=_given(args.new_tokens, defaults.new_tokens), dtype=canonical_dtype(args.dtype))


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _quality(args: argparse.Namespace, techniques: tuple[str, ...] | None = None) -> Any:
    from tuner.models import workload_defaults
    from tuner.quality import QualityConfig

    defaults = workload_defaults(args.model, _techniques(args) if techniques is None else techniques)
    tasks = tuple(t for t in _given(args.tasks, defaults.tasks).split(",") if t)
    examples = _given(args.examples, defaults.bench_examples if args.command == "bench" else defaults.tune_examples)
    from tuner.tasks import get_task

    for t in tasks:
        get_task(t)  # unknown task names are input errors, raised before loading anything
    return QualityConfig(tasks=tasks, examples_per_task=examples)


def cmd_tune(args: argparse.Namespace) -> int:
    from tuner.tune import TuneConfig, tune

    techniques = _techniques(args)
    cfg = TuneConfig(model=args.model, techniques=techniques, budget=args.budget, timeout_s=args.timeout,
                     quality_budget=args.quality_budget, quality_metric=args.quality_metric,
                     objective=args.objective, device=args.device, storage=args.storage, study_name=args.study,
                     out_dir=Path(args.out), sampler=args.sampler, seed=args.seed, workload=_workload(args),
                     quality=_quality(args), repeats=args.repeats, show_progress=not args.json,
                     draft_model=args.draft_model, draft_head=args.draft_head,
                     trust_remote_code=args.trust_remote_code)
    result = tune(cfg, log=_say)
    summary = {"policy": str(result.policy_path), "artefacts": str(result.artefacts_dir),
               "best_trial": result.best_trial, "budget_met": result.budget_met, "n_trials": result.n_trials,
               "measured": result.policy["measured"], "techniques": result.policy["techniques"]}
    if args.json:
        _print_json(summary)
    else:
        base, tuned = summary["measured"]["baseline"], summary["measured"]["tuned"]
        print(f"policy: {result.policy_path}  (best trial {result.best_trial} of {result.n_trials}; "
              f"quality budget {'met' if result.budget_met else 'NOT met, best effort saved'})")
        print(_table([dict(base, variant="dense"), dict(tuned, variant="tuned")],
                     ["variant", "ttft_ms", "latency_ms", "tokens_per_s", "quality"]))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from policies import load_policy_file
    from tuner.bench import run_bench
    from tuner.models import canonical_dtype, workload_defaults
    from tuner.workload import Workload

    policy = load_policy_file(args.policy) if args.policy else None
    if policy is not None:
        base = Workload.from_policy(policy)
    else:
        defaults = workload_defaults(args.model)
        base = Workload(prompt_tokens=defaults.prompt_tokens, new_tokens=defaults.new_tokens)
    techniques = tuple(policy.techniques) if policy is not None else ()
    workload = Workload(prompt_tokens=args.prompt_tokens or base.prompt_tokens,
                        new_tokens=args.new_tokens or base.new_tokens,
                        dtype=canonical_dtype(args.dtype) if args.dtype is not None else base.dtype)
    document = run_bench(args.model, policy, args.device, workload, repeats=args.repeats,
                         quality=_quality(args, techniques), with_presets=not args.no_presets, log=_say,
                         trust_remote_code=args.trust_remote_code)
    if args.json:
        _print_json(document)
    else:
        print(f"{document['model']} on {document['device']['id']}: {document['workload']}")
        columns = ["name", "ttft_ms", "latency_ms", "tokens_per_s", "peak_memory_mb", "kv_cache_mb", "quality"]
        if any(row.get("quality_ci95") is not None for row in document["results"]):
            columns.append("quality_ci95")
        columns += ["speedup_ttft", "speedup_latency"]
        if any(row.get("forwards_per_token") is not None for row in document["results"]):
            columns.append("forwards_per_token")
        print(_table(document["results"], columns))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from policies import apply_policy, load_policy
    from profilers.device import resolve_device, torch_device
    from tuner.models import load_model
    from tuner.tasks import prompt_ids

    device = resolve_device(args.device)
    dtype = args.dtype
    if dtype is None and args.policy:  # one file: run it in the dtype it was tuned for
        from policies import load_policy_file

        dtype = load_policy_file(args.policy).workload.dtype
    loaded = load_model(args.model, torch_device(device), dtype=dtype, trust_remote_code=args.trust_remote_code)
    source = args.policy or args.policies
    policy = None
    if source is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = load_policy(source, loaded.model, device=device, strict=bool(args.policy))
        for w in caught:
            _say(f"autotune: warning: {w.message}")
    _say(f"policy: {policy.source if policy is not None else 'none (dense)'}")
    tokenizer = loaded.tokenizer
    input_ids = prompt_ids(tokenizer, args.prompt, chat=not args.raw_prompt).to(torch_device(device))
    with apply_policy(loaded.model, policy) as tuned:
        out = tuned.generate(input_ids, max_new_tokens=args.max_new_tokens)
        stats = tuned.last_stats  # what a decode-loop owner (speculative, diffusion) did, or None
    text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        doc = {"prompt": args.prompt, "completion": text, "policy": source if policy else None}
        if stats is not None:
            doc[stats.report_key] = stats.to_dict()
        _print_json(doc)
    else:
        print(text)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from policies import PolicyError, load_policy_file

    status = EXIT_OK
    for path in args.files:
        try:
            load_policy_file(path)
        except PolicyError as exc:
            problems = getattr(exc, "problems", None) or [str(exc)]
            for problem in problems:
                line = problem if str(path) in problem else f"{path}: {problem}"
                print(line.splitlines()[0] if line else line)
            status = EXIT_USAGE
        else:
            print(f"{path}: ok")
    return status


def cmd_report(args: argparse.Namespace) -> int:
    from reports.report import write_report

    written = write_report(Path(args.path), Path(args.out) if args.out else None)
    for path in written:
        print(path)
    return EXIT_OK


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autotune", description="Hardware-aware tuning of LLM inference techniques.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def model_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="builtin:tiny", help="builtin:NAME or a local HF checkpoint directory")
        p.add_argument("--device", default=None, help="cpu, cpu:Nt (N threads), cuda, cuda:N or a device id "
                                                      "(default: first GPU, else the CPU)")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 weights and activations "
                                                     "(default float32; bench and run --policy: the policy's)")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="run modelling code shipped inside the checkpoint (LLaDA, Dream); off by default")

    def quality_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tasks", default=None, help="built-in tasks scored for quality (default: the model's; "
                                                     "needle,pattern for models that are not built in)")
        p.add_argument("--examples", type=int, default=None, help="examples per task (default: the model's, 20 "
                                                                  "for models that are not built in)")

    p = add("devices", cmd_devices, "List this machine's devices with their fingerprints and ids.")
    p.add_argument("--json", action="store_true")
    p = add("models", cmd_models, "List the built-in models.")
    p.add_argument("--json", action="store_true")

    p = add("profile", cmd_profile, "Per-layer latency and memory of a model on a device.")
    model_opt(p)
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--tokens", type=int, default=1024, help="prompt tokens (prefill) or KV-cache length (decode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write DIR/profile.json and the latency curves DIR/curves.csv")

    p = add("tune", cmd_tune, "Search technique settings on this device and write its policy YAML.")
    model_opt(p)
    p.add_argument("--techniques", required=True, help="comma-separated technique names")
    p.add_argument("--budget", type=int, default=20, help="total trials in the study (all workers)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--quality-budget", type=float, default=1.0, help="max quality drop vs dense, in points")
    p.add_argument("--quality-metric", default="accuracy", help="accuracy | top1_agreement | mean_kl")
    p.add_argument("--objective", default="latency_ms", help="ttft_ms | latency_ms | tokens_per_s")
    p.add_argument("--sampler", default="tpe", help="tpe | gp | random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: a journal file under --out)")
    p.add_argument("--study", default=None, help="study name (default: model--device--techniques)")
    p.add_argument("--out", default="policies", help="policy store directory")
    p.add_argument("--prompt-tokens", type=int, default=None, help="timed prompt length (default: the model's, "
                                                                   "1024 for models that are not built in)")
    p.add_argument("--new-tokens", type=int, default=None, help="timed new tokens (default: the model's, 32)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats per trial (median)")
    p.add_argument("--draft-model", default=None,
                   help="speculative: draft model sharing the tokenizer (default: the one known for --model)")
    p.add_argument("--draft-head", default=None,
                   help="speculative: EAGLE draft head, builtin:NAME or a directory (default: the model's known one)")
    quality_opts(p)
    p.add_argument("--json", action="store_true")

    p = add("bench", cmd_bench, "Dense vs a policy vs paper presets, side by side in one run.")
    model_opt(p)
    p.add_argument("--policy", help="policy YAML (omit to bench dense only)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: the policy's workload")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-presets", action="store_true")
    quality_opts(p)
    p.add_argument("--json", action="store_true")

    p = add("run", cmd_run, "Generate with the policy that matches this device (dense without one).")
    model_opt(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--policies", help="policy store directory (this device's file is picked)")
    group.add_argument("--policy", help="one policy YAML (refused if it does not match the model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--raw-prompt", action="store_true",
                   help="tokenize the prompt as is (default: through the tokenizer's chat template when it has one)")
    p.add_argument("--json", action="store_true")

    p = add("validate", cmd_validate, "Check policy files: exit 0 if all are valid, 2 otherwise.")
    p.add_argument("files", nargs="+")

    p = add("report", cmd_report, "Markdown + HTML report of a profile, a policy or a policy store.")
    p.add_argument("path", help="a policy YAML, a policy store directory or a `profile --out` directory")
    p.add_argument("--out", help="report.html path (Markdown written beside it)")
    return parser


def _usage_errors() -> tuple[type[BaseException], ...]:
    from policies import PolicyError
    from tuner.models import ModelSpecError
    from tuner.study import StudyConfigError

    return (UsageError, PolicyError, ModelSpecError, StudyConfigError, ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("AUTOTUNE_DEBUG") == "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _say("autotune: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI contract: one line, an exit code, no traceback
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, _usage_errors()):
            _say(f"autotune: error: {message}")
            return EXIT_USAGE
        _say(f"autotune: failed: {type(exc).__name__}: {message}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
