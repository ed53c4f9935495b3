"""How faithful is the per-layer profile?  Sum of the hooked parts vs the un-hooked whole forward.

The cost model predicts a policy's latency by adding up per-part curves, so those parts must add up to
what the model really costs.  For each mode and token count this prints one Markdown row with the sum
of the parts, the un-hooked forward (timed in the same process, interleaved with the hooked runs), their
ratio (fidelity; 1.0 = the parts explain the whole forward), the cost of the hooks themselves, and what
the hooks cannot see (``other``: rotary, masks, Python glue).

Usage::

    python benchmarks/bench_profiler_fidelity.py                      # random-init tiny Llama
    python benchmarks/bench_profiler_fidelity.py --device cuda --dtype bfloat16
    python benchmarks/bench_profiler_fidelity.py --model-path /path/to/checkpoint --device cuda

The default model is a random-init Llama of the built-in tiny model's shape (hidden 256, 6 layers,
4 heads / 2 KV heads, MLP 688, vocab 2048): latency does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profilers.device import resolve_device, torch_device  # noqa: E402
from profilers.layer_profiler import profile_model  # noqa: E402
from tuner.builtin.train_tiny import MODEL  # noqa: E402

# The shape of builtin:tiny, from the recipe that trained it (one source of truth).
TINY_SHAPE = dict(MODEL, vocab_size=2048)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    if args.model_path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path, local_files_only=True, dtype=dtype)
        label = f"{Path(args.model_path).name} ({type(model).__name__})"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_SHAPE)).to(dtype)
        label = "random Llama h256 L6 v2048"
    return model.to(device).eval(), label


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", help="local Hugging Face checkpoint dir (default: random tiny Llama)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or a device id (default: best)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)")
    ap.add_argument("--prefill-tokens", type=_ints, default=[128, 512, 1024, 2048])
    ap.add_argument("--decode-tokens", type=_ints, default=[512, 1024, 2048], help="KV tokens before the step")
    ap.add_argument("--decode-query", type=int, default=1, help="tokens per decode step")
    ap.add_argument("--modes", default="prefill,decode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", help="also write every profile as JSON to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        fp = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch_device(fp)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if fp.kind == "cuda" else torch.float32)
    model, label = _load(args, device, dtype)

    jobs = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "prefill" in modes:
        jobs += [("prefill", n) for n in args.prefill_tokens]
    if "decode" in modes:
        jobs += [("decode", n) for n in args.decode_tokens]

    cmd = " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_profiler_fidelity.py", *sys.argv[1:]])
    print(
        f"device: `{fp.id}` ({fp.name}), torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"command: `{cmd}`  (warmup {args.warmup}, repeats {args.repeats}, medians)")
    if hasattr(os, "getloadavg"):  # timings on a shared machine mean little without this
        print("load average at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    print(
        "| model | mode | n_tokens | n_query | sum of parts ms | unhooked ms | hooked ms | fidelity "
        "| paired fidelity | hook overhead % | other ms | noise % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    profiles = []
    worst = 0.0
    for mode, n in jobs:
        prof = profile_model(
            model, device, mode=mode, n_tokens=n, n_query=args.decode_query,
            warmup=args.warmup, repeats=args.repeats, seed=args.seed,
        )  # fmt: skip
        profiles.append(prof.to_json_dict(fp.to_dict(), label))
        worst = max(worst, abs(prof.fidelity - 1.0))
        print(
            f"| {label} | {mode} | {n} | {prof.n_query_tokens} | {prof.total_latency_ms:.3f} "
            f"| {prof.unhooked_latency_ms:.3f} | {prof.hooked_latency_ms:.3f} | {prof.fidelity:.3f} "
            f"| {prof.fidelity_paired:.3f} | {prof.hook_overhead_pct:+.1f} | {prof.other_ms:.3f} "
            f"| {prof.noise_pct:.1f} |",
            flush=True,
        )
    print()
    print(
        f"worst |fidelity - 1| = {worst * 100:.1f}%  (paired fidelity: median of per-run sums of parts; "
        "noise % = IQR / median of the un-hooked runs)"
    )
    if hasattr(os, "getloadavg"):
        print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(profiles, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
