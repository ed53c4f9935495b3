"""The CUDA paths that CI (CPU only) never runs, checked in one short run on a lent GPU.

    bash benchmarks/gpu_check.sh --out DIR          # on the GPU machine (<= 8 minutes on an H200)
    bash benchmarks/gpu_check.sh --dry-run --out DIR  # the same steps on this CPU, small sizes (CI runs it)

Steps, each recorded with its status, duration and numbers (a failing step does not stop the others):

1. ``fingerprint``  NVML + torch.cuda fingerprint; the device id is stable (list == resolve by index == by id).
2. ``profile``      per-layer prefill and decode profiles of builtin:tiny: the timer (CUDA events),
                    fidelity (sum of parts / whole forward), hook overhead, memory kind.
3. ``peak_memory``  the peak-memory reading of a dense generate (CUDA: the allocator's peak), twice: it repeats.
4. ``verify_curve`` latency of a verify forward over q chain-masked tokens after n_kv cached ones, q = 1..64.
5. ``two_four``     2:4 weight sparsity through ``to_sparse_semi_structured`` (sm80+): outputs vs the masked
                    dense weights, and decode latency beside dense.
6. ``bench:<technique>``  ``autotune tune --budget 2`` (the paper preset enqueued first, then one sampled trial)
                    and ``autotune bench`` of the policy beside dense, the presets and the peers, for
                    token_retention, speculative, sparsity, weight_sparsity (builtin:tiny) and
                    diffusion_blocks (builtin:tiny-mdm).

Everything runs in bf16 on the GPU (float32 in a dry run). Writes ``DIR/gpu_check.json`` (everything) and
``DIR/gpu_check.md`` (a section for benchmarks/RESULTS.md).
Exit 0 when every step that ran passed (in a dry run the CUDA-only checks are skipped, by name), else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing (the GPU machine has no pip index)
    sys.path.insert(0, str(ROOT))

from profilers.device import list_devices, resolve_device, torch_device  # noqa: E402
from tuner.cli import main as cli_main  # noqa: E402


class Skip(Exception):
    """A step that cannot run here (a CUDA-only check in a dry run), with the reason."""


@dataclass
class Sizes:
    """Workload sizes: full on the GPU, small in a dry run (CI's two CPU cores)."""

    prompt_tokens: int
    new_tokens: int
    examples: int
    repeats: int
    budget: int
    verify_kv: int
    verify_q: tuple[int, ...]
    tasks: str | None  # None: each technique's own tasks (BENCHES); a dry run scores the short `pattern` only

    @classmethod
    def for_run(cls, dry: bool) -> Sizes:
        if dry:
            return cls(prompt_tokens=64, new_tokens=4, examples=1, repeats=1, budget=1, verify_kv=64,
                       verify_q=(1, 4), tasks="pattern")
        return cls(prompt_tokens=512, new_tokens=32, examples=3, repeats=3, budget=2, verify_kv=1024,
                   verify_q=(1, 2, 4, 8, 16, 32, 64), tasks=None)


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | skipped
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


@dataclass
class Check:
    device: str  # "cuda" or, in a dry run, "cpu"
    dry: bool
    sizes: Sizes
    work: Path
    deadline: float
    dtype: str = "bfloat16"
    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[Check], dict[str, Any]]) -> Step:
        step = Step(name)
        start = time.perf_counter()
        if time.perf_counter() > self.deadline:  # a check that did not run is not a pass
            step.status, step.detail = "failed", "not run: out of time (the whole check is kept under 8 minutes)"
        else:
            try:
                step.numbers = fn(self)
                step.status = "ok"
            except Skip as exc:
                step.status, step.detail = "skipped", str(exc)
            except Exception as exc:  # a failing step is a finding; the others still run
                step.status = "failed"
                step.detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                step.numbers["traceback"] = traceback.format_exc(limit=8)
        step.seconds = round(time.perf_counter() - start, 2)
        self.steps.append(step)
        print(f"[gpu_check] {name}: {step.status} ({step.seconds:.1f} s) {step.detail}", flush=True)
        return step

    def cuda_only(self, what: str) -> None:
        if self.dry:
            raise Skip(f"{what} needs CUDA (dry run on the CPU)")


def cli(*args: str) -> dict[str, Any]:
    """Run one `autotune` command in this process with --json; its JSON document (exit != 0 raises)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([*args, "--json"])
    if code != 0:
        raise RuntimeError(f"autotune {args[0]} exited {code}: {err.getvalue().strip()[-300:]}")
    return json.loads(out.getvalue())


# ----------------------------------------------------------------------------------------------- steps


def step_fingerprint(c: Check) -> dict[str, Any]:
    devices = [d.to_dict() for d in list_devices()]
    if c.dry:
        fp = resolve_device("cpu")
        again = resolve_device(fp.id)
        if again.id != fp.id:
            raise AssertionError(f"cpu id does not round-trip: {fp.id} -> {again.id}")
        return {"devices": devices, "id": fp.id}
    cuda = [d for d in devices if d["kind"] == "cuda"]
    if not cuda:
        raise AssertionError(f"no CUDA device listed (torch.cuda.is_available() = {torch.cuda.is_available()})")
    first = resolve_device("cuda:0")
    by_id = resolve_device(first.id)
    if not (cuda[0]["id"] == first.id == by_id.id):
        raise AssertionError(f"device id unstable: list {cuda[0]['id']}, cuda:0 {first.id}, by id {by_id.id}")
    fields = first.to_dict()
    missing = [k for k in ("uuid", "compute_capability", "memory_total_mb", "driver_version") if not fields.get(k)]
    if missing:
        raise AssertionError(f"NVML fields missing from the fingerprint: {missing}")
    return {"devices": devices, "id": first.id, "fingerprint": fields}


def step_profile(c: Check) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("prefill", "decode"):
        doc = cli("profile", "--model", "builtin:tiny", "--device", c.device, "--dtype", c.dtype, "--mode", mode,
                  "--tokens", str(c.sizes.prompt_tokens), "--repeats", str(max(3, c.sizes.repeats * 3)))
        layers = doc["layers"]
        out[mode] = {k: doc.get(k) for k in ("total_latency_ms", "unhooked_latency_ms", "fidelity",
                                             "hook_overhead_pct", "noise_pct", "timer")}
        out[mode]["memory_kind"] = layers[0].get("memory_kind")
        out[mode]["decoder_layer_ms"] = [round(r["latency_ms"], 4) for r in layers if r["kind"] == "decoder_layer"]
        if not c.dry:
            if doc.get("timer") != "cuda_event":
                raise AssertionError(f"{mode} profile timed with {doc.get('timer')!r}, not CUDA events")
            if layers[0].get("memory_kind") != "cuda_peak_allocated":
                raise AssertionError(f"{mode} profile memory is {layers[0].get('memory_kind')!r}")
    return out


def step_peak_memory(c: Check) -> dict[str, Any]:
    from tuner.measure import peak_memory_of
    from tuner.models import load_model
    from tuner.workload import timing_input_ids

    dev = torch_device(resolve_device(c.device))
    loaded = load_model("builtin:tiny", dev, dtype=c.dtype)
    ids = timing_input_ids(loaded.tokenizer, c.sizes.prompt_tokens, dev)

    def generate(input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return loaded.model.generate(input_ids, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id,
                                     **kwargs)

    generate(ids, max_new_tokens=2, min_new_tokens=2)  # first-call costs (kernels, workspaces) outside the reading
    readings = [peak_memory_of(generate, ids, c.sizes.new_tokens, dev) for _ in range(2)]
    peaks = [r.peak_mb for r in readings]
    if any(p is None or p <= 0 for p in peaks):
        raise AssertionError(f"peak memory readings {peaks} ({readings[0].kind})")
    return {"kind": readings[0].kind, "peak_mb": peaks}


def step_verify_curve(c: Check) -> dict[str, Any]:
    from search_spaces.speculative_profiler import profile_verify
    from tuner.models import load_model

    dev = torch_device(resolve_device(c.device))
    lm = load_model("builtin:tiny", dev, dtype=c.dtype).model
    rows = profile_verify(lm, dev, n_kv=(c.sizes.verify_kv,), n_query=c.sizes.verify_q,
                          repeats=max(3, c.sizes.repeats * 3))
    one = next(r["ms"] for r in rows if r["n_query"] == 1)
    return {"n_kv": c.sizes.verify_kv, "ms": {r["n_query"]: round(r["ms"], 4) for r in rows},
            "ratio_vs_one_token": {r["n_query"]: round(r["ms"] / one, 3) for r in rows}}


def step_two_four(c: Check) -> dict[str, Any]:
    c.cuda_only("2:4 semi-structured sparsity")
    from policies import apply_policy, model_fingerprint
    from policies.testing import make_policy_dict
    from policies.weight_sparsity import semi_structured_problem
    from profilers.timing import time_callable
    from tuner.models import load_model
    from tuner.workload import timing_input_ids

    dev = torch_device(resolve_device(c.device))
    loaded = load_model("builtin:tiny", dev, dtype=c.dtype)
    model = loaded.model
    problem = semi_structured_problem(model.model.layers[0].mlp.up_proj.weight)
    if problem is not None:
        raise Skip(f"2:4 unavailable: {problem}")
    section = {"method": "magnitude", "structure": "2:4"}
    policy = make_policy_dict(model_fingerprint(model), techniques={"weight_sparsity": section})
    ids = timing_input_ids(loaded.tokenizer, c.sizes.prompt_tokens, dev)
    step = ids[:, -1:]

    def decode_ms(fn: Callable[[], Any]) -> float:
        return time_callable(fn, dev, warmup=3, repeats=20).median_ms

    with torch.inference_mode():
        dense_logits = model(ids).logits.float()
        dense_ms = decode_ms(lambda: model(step))
        with apply_policy(model, policy):
            sparse_logits = model(ids).logits.float()
            sparse_ms = decode_ms(lambda: model(step))
        restored = model(ids).logits.float()
    if not torch.equal(restored, dense_logits):
        raise AssertionError("remove() did not restore the dense weights bit for bit")
    agree = (sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item()
    return {"dense_forward_ms": round(dense_ms, 4), "two_four_forward_ms": round(sparse_ms, 4),
            "speedup": round(dense_ms / sparse_ms, 3), "top1_agreement_vs_dense": round(agree, 4)}


BENCHES: list[tuple[str, str, str, list[str]]] = [
    # technique, model, objective, extra tune arguments
    ("token_retention", "builtin:tiny", "ttft_ms", ["--tasks", "needle"]),  # later --tasks win (argparse)
    ("speculative", "builtin:tiny", "tokens_per_s", ["--tasks", "pattern"]),
    ("sparsity", "builtin:tiny", "tokens_per_s", ["--tasks", "pattern"]),
    ("weight_sparsity", "builtin:tiny", "tokens_per_s", ["--tasks", "pattern"]),
    ("diffusion_blocks", "builtin:tiny-mdm", "tokens_per_s", ["--tasks", "needle,pattern"]),
]


def bench_step(technique: str, model: str, objective: str, extra: list[str]) -> Callable[[Check], dict[str, Any]]:
    def run(c: Check) -> dict[str, Any]:
        s = c.sizes
        store = c.work / f"policies-{technique}"
        tasks = ["--tasks", s.tasks] if s.tasks else []
        common = ["--model", model, "--device", c.device, "--dtype", c.dtype, "--examples", str(s.examples), *extra,
                  *tasks]
        tuned = cli("tune", *common, "--techniques", technique, "--objective", objective, "--budget", str(s.budget),
                    "--prompt-tokens", str(s.prompt_tokens), "--new-tokens", str(s.new_tokens),
                    "--repeats", str(s.repeats), "--out", str(store))
        bench = cli("bench", *common, "--policy", tuned["policy"], "--repeats", str(s.repeats))
        rows = [{k: r.get(k) for k in ("name", "ttft_ms", "latency_ms", "tokens_per_s", "peak_memory_mb",
                                       "memory_kind", "quality", "speedup_latency", "speedup_ttft",
                                       "decode_speedup")} for r in bench["results"]]
        if not c.dry and any(r["memory_kind"] != "cuda_peak_allocated" for r in rows):
            raise AssertionError(f"bench memory kinds {[r['memory_kind'] for r in rows]}")
        return {"model": model, "objective": objective, "policy": tuned["policy"],
                "budget_met": tuned["budget_met"], "techniques": tuned["techniques"], "rows": rows}

    return run


# --------------------------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def markdown(c: Check, device_name: str, started: str, elapsed: float) -> str:
    lines = [f"## GPU check ({'dry run on the CPU' if c.dry else device_name})", "",
             f"`bash benchmarks/gpu_check.sh{' --dry-run' if c.dry else ''}`, {started}, dtype {c.dtype}, "
             f"prompt {c.sizes.prompt_tokens} tokens, {c.sizes.new_tokens} new, {c.sizes.repeats} repeats "
             f"(medians); {elapsed:.0f} s in all.", "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in c.steps]
    for s in c.steps:
        if s.status != "ok":
            continue
        if s.name == "profile":
            for mode, d in s.numbers.items():
                lines.append(f"- profile {mode}: timer {d.get('timer')}, fidelity {_fmt(d.get('fidelity'))}, hook "
                             f"overhead {_fmt(d.get('hook_overhead_pct'))}%, whole forward "
                             f"{_fmt(d.get('unhooked_latency_ms'))} ms, memory {d.get('memory_kind')}")
        elif s.name == "verify_curve":
            lines.append(f"- verify forward / one token at n_kv {s.numbers['n_kv']}: {s.numbers['ratio_vs_one_token']}")
        elif s.name == "peak_memory":
            lines.append(f"- peak memory of a dense generate ({s.numbers['kind']}): {s.numbers['peak_mb']} MiB")
        elif s.name == "two_four":
            n = s.numbers
            lines.append(f"- 2:4: forward {n['two_four_forward_ms']} ms vs dense {n['dense_forward_ms']} ms "
                         f"({n['speedup']}x), top-1 agreement {n['top1_agreement_vs_dense']}")
        elif s.name.startswith("bench:"):
            lines += ["", f"`{s.name}` ({s.numbers['model']}, objective {s.numbers['objective']}, budget met: "
                      f"{s.numbers['budget_met']})", "",
                      "| variant | TTFT ms | latency ms | tok/s | peak MiB | quality | vs dense (latency) |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['name']} | {_fmt(r['ttft_ms'])} | {_fmt(r['latency_ms'])} | {_fmt(r['tokens_per_s'])} | "
                      f"{_fmt(r['peak_memory_mb'])} | {_fmt(r['quality'])} | {_fmt(r['speedup_latency'])} |"
                      for r in s.numbers["rows"]]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU with small sizes")
    parser.add_argument("--out", default="gpu-check-out", help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no step after this many seconds")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        os.environ.setdefault("AUTOTUNE_CACHE", str(Path(work) / "cache"))
        # bf16 on the GPU; a dry run keeps float32, which this CPU runs 2-4x faster at builtin:tiny's sizes.
        check = Check(device="cpu" if args.dry_run else "cuda", dry=args.dry_run,
                      sizes=Sizes.for_run(args.dry_run), work=Path(work), deadline=t0 + args.budget_s,
                      dtype="float32" if args.dry_run else "bfloat16")
        steps: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
            ("fingerprint", step_fingerprint), ("profile", step_profile), ("peak_memory", step_peak_memory),
            ("verify_curve", step_verify_curve), ("two_four", step_two_four),
        ] + [(f"bench:{t}", bench_step(t, m, o, e)) for t, m, o, e in BENCHES]
        wanted = set(args.only.split(",")) if args.only else None
        for name, fn in steps:
            if wanted is None or name in wanted:
                check.run(name, fn)
    elapsed = time.perf_counter() - t0
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    document = {"dry_run": args.dry_run, "device": device_name, "started": started, "seconds": round(elapsed, 1),
                "torch": torch.__version__, "dtype": check.dtype, "sizes": check.sizes.__dict__,
                "steps": [s.__dict__ for s in check.steps],
                "summary": {"ok": sum(s.status == "ok" for s in check.steps),
                            "failed": [s.name for s in check.steps if s.status == "failed"],
                            "skipped": [s.name for s in check.steps if s.status == "skipped"],
                            "median_step_s": statistics.median([s.seconds for s in check.steps] or [0.0])}}
    import transformers

    document["transformers"] = transformers.__version__
    _write(out / "gpu_check.json", json.dumps(document, indent=2, default=str))
    _write(out / "gpu_check.md", markdown(check, device_name, started, elapsed))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {elapsed:.0f} s")
    return 1 if document["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
