"""Overhead of the policy runtime: ``model.generate`` vs ``apply_policy(model, empty_policy).generate``.

A dense policy must cost nothing measurable (target: <= 2 %), because users keep the
``with apply_policy(...)`` wrapper on their hot path whether or not their device has a tuned file.

Greedy decoding of ``--new-tokens`` (64) after a ``--prompt-tokens`` (128) prompt, on a random-init
Llama (hidden 256, 6 layers, vocab 2048) or on a local checkpoint (``--model-path DIR``). Repeats are
interleaved and the order inside each pair alternates, so drift on a shared machine hits both sides
alike; we report medians, their ratio, and the median of the per-pair ratios. Prints one Markdown row.

    python benchmarks/bench_handle_overhead.py [--repeats 20] [--device cuda] [--model-path DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from policies import apply_policy, model_fingerprint, policy_from_dict  # noqa: E402


def _device_label(device: torch.device) -> str:
    try:
        from profilers.device import resolve_device

        fp = resolve_device("cuda:0" if device.type == "cuda" else "cpu")
        return f"{fp.name} ({fp.id})"
    except Exception:  # the benchmark must run even where the profiler cannot fingerprint
        return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _device_dict(device: torch.device) -> dict[str, Any]:
    try:
        from profilers.device import resolve_device

        return resolve_device("cuda:0" if device.type == "cuda" else "cpu").to_dict()
    except Exception:
        return {"id": device.type, "kind": device.type, "name": device.type, "index": None}


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The model and the generate kwargs that force exactly ``--new-tokens`` tokens."""
    if args.model_path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path, local_files_only=True)
        # Keep EOS semantics of the checkpoint but never stop early, so both sides decode as much.
        extra = {"min_new_tokens": args.new_tokens}
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=688, vocab_size=2048, max_position_embeddings=1024)
        model = LlamaForCausalLM(cfg)
        model.generation_config.eos_token_id = None  # random weights: no EOS, always the full length
        extra = {"pad_token_id": 0}
    return model.to(device).eval(), extra


def empty_policy(model: Any, device: torch.device, args: argparse.Namespace) -> Any:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return policy_from_dict({
        "schema_version": 1,
        "model": {"id": args.model_path or "random:llama-256x6", "fingerprint": model_fingerprint(model)},
        "device": _device_dict(device),
        "workload": {"batch_size": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "dtype": dtype},
        "objective": {"metric": "latency_ms", "direction": "minimize", "quality_metric": None, "quality_budget": 0.0},
        "techniques": {},
        "provenance": {"tool_version": "bench", "created_at": dt.datetime.now(dt.timezone.utc).isoformat()},
    })


class _StubModel:
    """Stands in for the model so the handle's own dispatch cost can be timed without model noise."""

    def generate(self, *args: Any, **kwargs: Any) -> None:
        return None


def dispatch_overhead_us(kwargs: dict[str, Any], input_ids: torch.Tensor, calls: int = 100_000) -> float:
    """Per-call cost (microseconds) of ``handle.generate`` over a direct ``model.generate`` call; best of 5
    rounds each, so load from other processes (which only ever adds time) is filtered out."""
    stub = _StubModel()
    handle = apply_policy(stub, None)

    def direct() -> None:
        for _ in range(calls):
            stub.generate(input_ids, do_sample=False, **kwargs)

    def wrapped() -> None:
        for _ in range(calls):
            handle.generate(input_ids, **kwargs)

    best = {direct: float("inf"), wrapped: float("inf")}
    for _ in range(5):
        for fn in best:
            start = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - start)
    return (best[wrapped] - best[direct]) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="local HF checkpoint directory (default: random-init Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved pairs (>= 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error("--repeats must be >= 10")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, extra = build_model(args, device)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (1, args.prompt_tokens), generator=gen).to(device)
    mask = torch.ones_like(input_ids)
    kwargs = {"attention_mask": mask, "max_new_tokens": args.new_tokens, **extra}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    handle = apply_policy(model, empty_policy(model, device, args))

    def run_dense() -> torch.Tensor:
        return model.generate(input_ids, do_sample=False, **kwargs)

    def run_handle() -> torch.Tensor:
        return handle.generate(input_ids, **kwargs)

    with torch.inference_mode():
        reference = run_dense()
        assert reference.shape[1] == args.prompt_tokens + args.new_tokens, reference.shape
        assert torch.equal(run_handle(), reference), "dense handle output differs from model.generate"
        for _ in range(args.warmup):
            run_dense()
            run_handle()
        samples: dict[str, list[float]] = {"dense": [], "handle": []}
        for i in range(args.repeats):
            order = [("dense", run_dense), ("handle", run_handle)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3)
    handle.remove()
    dispatch_us = dispatch_overhead_us(kwargs, input_ids)

    dense_ms, handle_ms = statistics.median(samples["dense"]), statistics.median(samples["handle"])
    overhead = (handle_ms / dense_ms - 1) * 100
    paired = statistics.median(h / d for h, d in zip(samples["handle"], samples["dense"], strict=True))
    command = "python benchmarks/bench_handle_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print("| device | date | command | model.generate median ms | handle.generate median ms | overhead % "
          "| paired-ratio overhead % | handle dispatch µs/call (% of generate) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {_device_label(device)} | {dt.date.today().isoformat()} | `{command.strip()}` | {dense_ms:.2f} "
          f"| {handle_ms:.2f} | {overhead:+.2f} | {(paired - 1) * 100:+.2f} "
          f"| {dispatch_us:.2f} ({dispatch_us / 1e3 / dense_ms * 100:.5f} %) |")
    print(f"\n{args.repeats} interleaved pairs, {args.new_tokens} new tokens after {args.prompt_tokens}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"dense min/max {min(samples['dense']):.2f}/{max(samples['dense']):.2f} ms, "
          f"handle min/max {min(samples['handle']):.2f}/{max(samples['handle']):.2f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
