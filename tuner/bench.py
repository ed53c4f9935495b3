"""`autotune bench`: dense, the policy, each technique's paper presets and its peers, side by side in one process.

Repeats are interleaved (dense, policy, presets, peers, dense, policy, ...) so that drift on a shared machine
(thermal, a neighbour's job) hits every variant alike; each variant's numbers are medians. Quality is
scored once per variant with the same harness as tuning, against the same dense reference.

Peers (`SearchSpace.peers`) are other systems' implementations of a technique in the policy (e.g. Hugging
Face assisted generation for speculative decoding): not policies but generate callables, run on the dense
model through exactly the same timing and quality code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policies import Policy, PolicyHandle, apply_policy, model_fingerprint, policy_from_dict, policy_to_dict
from profilers.device import resolve_device, torch_device
from search_spaces import SearchContext, get_search_space
from tuner.measure import (
    GenerateFn,
    GenerationSample,
    MemoryReading,
    forwards_per_token,
    measure_once,
    peak_memory_of,
    prefill_kv_cache_mb,
    summarize,
    time_generate,
)
from tuner.models import default_draft_head, default_draft_model, load_model
from tuner.quality import QualityConfig, QualityHarness, QualityReport, wilson_interval
from tuner.workload import Workload, timing_input_ids


@dataclass(frozen=True)
class Variant:
    """One benchmarked column: a policy applied to the model (None: dense), or a peer's own `generate`
    callable, which runs on the dense model (its own decode loop; never together with a policy)."""

    name: str  # "dense" | "policy" | "preset:<name>" | "peer:<name>"
    policy: Policy | None = None
    generate: GenerateFn | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.policy is not None and self.generate is not None:
            raise ValueError(f"variant {self.name!r}: a policy or a generate callable, not both")

    def apply(self, model: Any) -> PolicyHandle:
        """The model as this variant runs: the policy applied, or dense (a peer brings only its decode loop)."""
        return apply_policy(model, self.policy)

    def generate_fn(self, handle: PolicyHandle) -> GenerateFn:
        """What is timed and scored: the peer's callable, else the policy handle's generate."""
        return self.generate if self.generate is not None else handle.generate


def _preset_variants(policy: Policy, ctx: SearchContext) -> list[Variant]:
    """One variant per paper preset of each technique in the policy (other sections kept as tuned)."""
    base = policy_to_dict(policy)
    variants = []
    for name in base["techniques"]:
        for preset in get_search_space(name).presets(ctx):
            document = dict(base, techniques={**base["techniques"], name: preset.section})
            variants.append(Variant(f"preset:{preset.name}", policy_from_dict(document), source=preset.source))
    return variants


def _peer_variants(policy: Policy, model: Any, ctx: SearchContext) -> list[Variant]:
    """One variant per peer of each technique in the policy (`SearchSpace.peers`), named `peer:<name>`."""
    variants = []
    for name, section in policy.techniques.items():
        for peer in get_search_space(name).peers(model, dict(section), ctx):
            variants.append(Variant(f"peer:{peer.name}", generate=peer.generate, source=peer.source))
    return variants


def _accuracy_interval(report: QualityReport, metric: str) -> tuple[float, float] | None:
    """The 95% Wilson interval of task accuracy over every scored example (tasks score the same number of
    examples, so the mean over tasks is the pooled rate); None for other metrics."""
    if metric != "accuracy" or report.n_examples == 0:
        return None
    lo, hi = wilson_interval(report.accuracy * report.n_examples / 100.0, report.n_examples)
    return round(lo, 2), round(hi, 2)


def run_bench(model_spec: str, policy: Policy | None, device_spec: str | None = None,
              workload: Workload | None = None, repeats: int = 5, quality: QualityConfig | None = None,
              with_presets: bool = True, with_peers: bool = True, log: Any = None,
              trust_remote_code: bool = False) -> dict[str, Any]:
    """Benchmark the variants; returns the `--json` document (see README for the contract)."""
    say = log or (lambda msg: None)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    device = resolve_device(device_spec)
    dev = torch_device(device)
    if workload is None:
        workload = Workload.from_policy(policy) if policy is not None else Workload()
    loaded = load_model(model_spec, dev, dtype=workload.dtype, trust_remote_code=trust_remote_code)
    variants = [Variant("dense")]
    if policy is not None:
        # Refuses a policy for another model before any timing.
        apply_policy(loaded.model, policy).remove()
        variants.append(Variant("policy", policy))
        # No `prepare` here (no study): presets that need its measurements are skipped by their spaces.
        ctx = SearchContext(model_fingerprint=model_fingerprint(loaded.model), workload=workload.as_dict(),
                            device=device.to_dict(), model_id=loaded.model_id,
                            draft_model=default_draft_model(loaded.model_id),
                            draft_head=default_draft_head(loaded.model_id), model=loaded.model,
                            tokenizer=loaded.tokenizer)
        if with_presets:
            variants.extend(_preset_variants(policy, ctx))
        if with_peers:
            variants.extend(_peer_variants(policy, loaded.model, ctx))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"bench variant names must be unique, got {names}")

    harness = QualityHarness(loaded.model, loaded.tokenizer, quality or QualityConfig())
    reference = harness.reference()
    metric = (policy.objective.quality_metric if policy is not None else None) or "accuracy"
    qualities: dict[str, float] = {"dense": reference.metric(metric)}
    intervals: dict[str, tuple[float, float] | None] = {"dense": _accuracy_interval(reference, metric)}
    input_ids = timing_input_ids(loaded.tokenizer, workload.prompt_tokens, dev)
    samples: dict[str, list[GenerationSample]] = {v.name: [] for v in variants}
    memory: dict[str, MemoryReading] = {}
    kv_mb: dict[str, float | None] = {}
    forwards: dict[str, float | None] = {}
    for v in variants:
        with v.apply(loaded.model) as handle:
            generate = v.generate_fn(handle)
            kv_mb[v.name] = prefill_kv_cache_mb(handle, input_ids)  # a peer: the dense model's cache
            if v.name != "dense":
                # forward: the handle (for a peer, the dense model: peers change decoding, not the logits)
                report = harness.evaluate(generate, handle)
                qualities[v.name], intervals[v.name] = report.metric(metric), _accuracy_interval(report, metric)
            time_generate(generate, input_ids, 1, dev)  # warm-up of both call shapes
            time_generate(generate, input_ids, workload.new_tokens, dev)
            memory[v.name] = peak_memory_of(generate, input_ids, workload.new_tokens, dev)  # untimed
        say(f"{v.name}: {metric} {qualities[v.name]:.2f}")
    for r in range(repeats):
        for v in variants:
            with v.apply(loaded.model) as handle:
                sample = measure_once(v.generate_fn(handle), input_ids, workload.new_tokens, dev)
                forwards[v.name] = forwards_per_token(handle) if v.generate is None else None
            samples[v.name].append(sample)
        say(f"repeat {r + 1}/{repeats} done")
    results = []
    for v in variants:
        m = summarize(samples[v.name], workload.new_tokens, memory[v.name])
        results.append({"name": v.name, "ttft_ms": m.ttft_ms, "latency_ms": m.latency_ms,
                        "tokens_per_s": m.tokens_per_s, "peak_memory_mb": m.peak_memory_mb,
                        "memory_kind": m.memory_kind, "kv_cache_mb": kv_mb[v.name], "quality": qualities[v.name],
                        "quality_metric": metric, "quality_ci95": intervals[v.name],
                        "quality_examples": reference.n_examples, "source": v.source,
                        "forwards_per_token": forwards.get(v.name)})
    dense = results[0]
    for row in results:
        row["speedup_latency"] = dense["latency_ms"] / row["latency_ms"]
        row["speedup_ttft"] = dense["ttft_ms"] / row["ttft_ms"]
        row["decode_speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]  # the speculative decoding metric
    return {"device": device.to_dict(), "model": loaded.model_id, "workload": workload.as_dict(),
            "repeats": repeats, "results": results}
