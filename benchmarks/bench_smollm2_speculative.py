"""Draft-free speculative decoding on a real chat model: builtin:smollm2-135m (SmolLM2-135M-Instruct), fp32 CPU.

Greedy, batch 1, chat template applied (`tuner.tasks.prompt_ids`), over `--prompts` requests of the `chat` task
(explain / summarise / continue, over Python's reference prose and held-out stdlib code) plus `--passkey`
prompts of the `passkey` task (~1.1k tokens). Every call generates exactly `--new-tokens` tokens (EOS
suppressed, `min_new_tokens = max_new_tokens`, as every bench of this project times).

Variants, none needing a second model: dense (`model.generate`), Hugging Face prompt-lookup decoding
(`model.generate(..., prompt_lookup_num_tokens=10)`, `search_spaces.speculative_peers`), and this project's
`speculative` runtime with the drafters `prompt_lookup` (HF's defaults; two chains of 5 from 3-grams),
`recycle` (a [2,2,1] tree; a [2,1,1] tree merged with a 2-gram lookup branch, the shape `autotune tune` picks
on builtin:tiny) and `layer_skip` (skipping every other layer of the upper half, with a chain of 3 and a small
dynamic tree; skipping every other of the top 8 layers, with a chain of 3). Shapes follow
`search_spaces.speculative`'s presets, scaled down: on this CPU a 16-token verify costs ~2.7x a one-token
forward, so gpt-fast's chain of 5 and EAGLE-2's (5, 4, 8) tree lose before acceptance is counted.

Timing (decode tokens/s = decoded tokens / decode time; `--new-tokens` per call):
- one call (this project's runtime, and dense): decode time = the end of a `new_tokens` call minus the start of
  the model's *second* forward in it (a forward pre-hook): by then the prompt is prefilled and the first token
  picked, which is what a one-token call does, so this is t(new_tokens) - t(1) measured inside one call. The
  decoded tokens are new_tokens - 1.
- two calls (HF prompt lookup, whose first forward already verifies lookup candidates along with the prompt,
  and dense again, as the check of the one-call method): (new_tokens - 1) / (t(new_tokens) - t(1)), each t the
  wall time of a `generate` call; HF prompt lookup's ratio is against dense timed the same way.
Each time is the median over `--repeats` interleaved repeats (prompt by prompt, variants in a rotating
order). A variant's tok/s over a group of prompts is their total decoded tokens over their total decode time.
Accepted/step: accepted draft tokens per verify step (`SpeculativeHandle.last_stats`), over all steps of all
prompts. Every timed `new_tokens` output is compared with dense's timed output of that prompt at that thread
count, token for token: a prompt counts as a mismatch if any call differs (lossless is required).

With a draft head for the model (`builtin:smollm2-135m-eagle`, `tuner.builtin.train_eagle`; `--no-eagle` leaves
it out), the `eagle` drafter's variants join: EAGLE-2's defaults (dynamic tree, top-k 10, 60 tokens), SGLang's
(5 steps, top-k 4, 8 tokens), chains, and small dynamic trees with a draft vocabulary of 8192 or 4096 tokens
(FR-Spec). Their rows also give the acceptance by depth (alpha_d: how often depth d was accepted when depth d-1
was) and the head's drafting time per verify step (the drafter's `propose`, timed inside the timed calls).
`--policy FILE` (repeatable) adds a tuned policy's speculative section as a variant (e.g. the 1-thread and
2-thread policies of `autotune tune`, each benched on both devices).

`--threads 1,2` runs one table per thread count (the same CPU at 1 and at 2 threads are two devices in this
project, `cpu:1t` / `cpu:2t`), repeats interleaved across thread counts, and names each one's best variant.

    python benchmarks/bench_smollm2_speculative.py [--prompts 12] [--passkey 2] [--threads 1,2] [--repeats 3]
        [--no-eagle] [--policy FILE ...] [--identity 200]

`--identity N` then checks greedy identity alone (untimed) on N more chat prompts (seed SEED + 1, `--identity-
tokens` new tokens each) for the fastest lossless variant at the first thread count (`--identity-of eagle`: the
fastest whose name holds "eagle"), against dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import transformers  # noqa: E402

from policies.registry import get_runtime  # noqa: E402
from profilers.device import use_cpu_threads  # noqa: E402
from search_spaces.speculative_eagle import acceptance_by_depth  # noqa: E402
from search_spaces.speculative_peers import PROMPT_LOOKUP_NUM_TOKENS, hf_speculative_peers  # noqa: E402
from search_spaces.speculative_trees import branching_tree, chain_tree  # noqa: E402
from tuner.models import load_model  # noqa: E402
from tuner.tasks import get_task, prompt_ids  # noqa: E402

MODEL = "builtin:smollm2-135m"
SEED = 4242
GenerateFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Prompt:
    """One timed prompt: a label, its group (chat-prose, chat-code, passkey) and its chat-templated ids."""

    label: str
    group: str
    ids: torch.Tensor


@dataclass
class Variant:
    """A way to decode: its `generate(ids, max_new_tokens=, min_new_tokens=)` and, for this project's
    runtime, the handle whose `last_stats` says what the latest call accepted."""

    name: str
    generate: GenerateFn
    handle: Any = None
    two_call: bool = False  # timed as t(n) - t(1) over two calls (else inside one call, see the module docstring)
    accepted: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (threads, prompt) -> per step
    draft_ms: dict[int, list[float]] = field(default_factory=dict)  # threads -> drafter propose() times (eagle)


def build_prompts(tokenizer: Any, n_chat: int, n_passkey: int, n_chars: int) -> list[Prompt]:
    """`n_chat` requests of the mixed `chat` task (n_chars-character passages) and `n_passkey` passkey prompts."""
    chat = dataclasses.replace(get_task("chat"), n_chars=n_chars)  # the registered task, this passage size
    out = [Prompt(f"{r.kind}/{r.source}#{i}", f"chat-{r.source}", prompt_ids(tokenizer, r.prompt, chat=True))
           for i, r in enumerate(chat.requests(n_chat, seed=SEED))]
    passkey = get_task("passkey")
    out += [Prompt(f"passkey#{i}", "passkey", prompt_ids(tokenizer, e.prompt, chat=passkey.chat))
            for i, e in enumerate(passkey.examples(n_passkey, seed=SEED))]
    return out


def speculative_sections(n_layers: int) -> dict[str, dict[str, Any]]:
    """The `techniques.speculative` sections benched, by variant name (no draft model among them)."""
    upper_odd = [i for i in range(n_layers // 2, n_layers) if i % 2 == 1]
    top_odd = [i for i in range(n_layers - 8, n_layers) if i % 2 == 1]
    chain3 = {"kind": "static", "parents": chain_tree(3)}
    tree_221 = {"kind": "static", "parents": branching_tree([2, 2, 1])}
    tree_211 = {"kind": "static", "parents": branching_tree([2, 1, 1])}
    return {
        "prompt_lookup 2-gram, depth 10 (HF defaults)": {
            "drafter": "prompt_lookup", "prompt_lookup": {"max_ngram": 2, "depth": 10, "candidates": 1}},
        "prompt_lookup 3-gram, 2 chains of 5": {
            "drafter": "prompt_lookup", "prompt_lookup": {"max_ngram": 3, "depth": 5, "candidates": 2}},
        "recycle, tree [2,2,1] (10 nodes)": {
            "drafter": "recycle", "recycle": {"k": 8}, "tree": tree_221},
        "recycle, tree [2,1,1] (6 nodes) + 2-gram lookup depth 5": {
            "drafter": "recycle", "recycle": {"k": 8}, "tree": tree_211,
            "prompt_lookup": {"max_ngram": 2, "depth": 5, "candidates": 1}},
        f"layer_skip odd upper ({len(upper_odd)}/{n_layers}), chain k=3": {
            "drafter": "layer_skip", "skip_layers": upper_odd, "tree": chain3},
        f"layer_skip odd upper ({len(upper_odd)}/{n_layers}), dynamic (3, 2, 4)": {
            "drafter": "layer_skip", "skip_layers": upper_odd, "tree": {"kind": "dynamic", "depth": 3, "topk": 2,
                                                                         "tokens": 4}},
        f"layer_skip odd top-8 ({len(top_odd)}/{n_layers}), chain k=3": {
            "drafter": "layer_skip", "skip_layers": top_odd, "tree": chain3},
    }


def eagle_sections(head: str, vocab_size: int) -> dict[str, dict[str, Any]]:
    """The eagle drafter's sections benched, by variant name."""
    def section(tree: dict[str, Any], vocab: int | None = None) -> dict[str, Any]:
        return {"drafter": "eagle", "eagle": {"head": head, "vocab": vocab}, "tree": tree, "node_budget": 64}

    out = {
        "eagle, EAGLE-2 defaults: dynamic (6, 10, 59)": section({"kind": "dynamic", "depth": 6, "topk": 10,
                                                                  "tokens": 59}),
        "eagle, SGLang: dynamic (5, 4, 7)": section({"kind": "dynamic", "depth": 5, "topk": 4, "tokens": 7}),
        "eagle, chain k=5": section({"kind": "static", "parents": chain_tree(5)}),
        "eagle, chain k=3": section({"kind": "static", "parents": chain_tree(3)}),
        "eagle, dynamic (4, 2, 6)": section({"kind": "dynamic", "depth": 4, "topk": 2, "tokens": 6}),
    }
    for vocab, trees in ((8192, ((4, 2, 6), (5, 3, 10))), (4096, ((3, 2, 4), (4, 2, 6)))):
        for depth, topk, tokens in trees if vocab < vocab_size else ():
            out[f"eagle, dynamic ({depth}, {topk}, {tokens}), vocab {vocab}"] = section(
                {"kind": "dynamic", "depth": depth, "topk": topk, "tokens": tokens}, vocab)
    if 4096 < vocab_size:
        out["eagle, chain k=3, vocab 4096"] = section({"kind": "static", "parents": chain_tree(3)}, 4096)
    return out


def policy_sections(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """The speculative sections of tuned policy files, named by file and device."""
    from policies.io import load_policy_file

    out = {}
    for path in paths:
        policy = load_policy_file(path)
        section = policy.techniques.get("speculative")
        if section is None:
            raise SystemExit(f"{path}: no techniques.speculative section")
        out[f"tuned policy {path.parent.name}/{path.name}"] = dict(section)
    return out


class _TimedPropose:
    """Wraps a drafter's `propose` to collect its wall times (ms) into `sink` (the current thread count's)."""

    def __init__(self, drafter: Any) -> None:
        self.drafter, self.sink = drafter, None
        self._propose = drafter.propose
        drafter.propose = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self._propose(*args, **kwargs)
        if self.sink is not None:
            self.sink.append((time.perf_counter() - start) * 1e3)
        return out


def build_variants(model: Any, pad_token_id: int, extra: dict[str, dict[str, Any]] | None = None) -> list[Variant]:
    """Dense, HF prompt lookup, and one `speculative` handle per section of `speculative_sections` and `extra`."""

    def dense(ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        return model.generate(ids, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=pad_token_id,
                              **kw)

    variants = [Variant("dense (HF generate)", dense, two_call=True)]
    peer = next(p for p in hf_speculative_peers(model, {}) if p.name == "hf-prompt-lookup")
    variants.append(Variant(f"HF prompt lookup ({PROMPT_LOOKUP_NUM_TOKENS} tokens)", peer.generate,
                            two_call=True))
    runtime = get_runtime("speculative")
    for name, section in {**speculative_sections(model.config.num_hidden_layers), **(extra or {})}.items():
        handle = runtime.apply(model, section)
        variants.append(Variant(name, _handle_generate(handle, model), handle))
    return variants


def timed_proposals(variants: list[Variant]) -> dict[str, _TimedPropose]:
    """Timers on the eagle variants' drafters, by variant name."""
    from policies.drafters import EagleDrafter

    return {v.name: _TimedPropose(v.handle.drafter) for v in variants
            if v.handle is not None and isinstance(v.handle.drafter, EagleDrafter)}


def _handle_generate(handle: Any, model: Any) -> GenerateFn:
    """The handle's generate as a `generate(ids, **kw)` callable."""
    def generate(ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        return handle.generate(model, ids, **kw)

    return generate


class SecondForwardClock:
    """Marks when `model`'s second forward of a call starts (a forward pre-hook): the prefill is done and the
    first token picked by then, so the rest of the call is decoding."""

    def __init__(self, model: Any) -> None:
        self.forwards = 0
        self.mark: float | None = None
        self._hook = model.register_forward_pre_hook(self._pre)

    def _pre(self, module: Any, args: Any) -> None:
        self.forwards += 1
        if self.forwards == 2:
            self.mark = time.perf_counter()

    def reset(self) -> None:
        self.forwards, self.mark = 0, None

    def remove(self) -> None:
        self._hook.remove()


def timed_call(generate: GenerateFn, ids: torch.Tensor, n: int,
               clock: SecondForwardClock) -> tuple[float, float | None, torch.Tensor]:
    """(wall ms, ms from the second forward's start to the end or None, output) of a call making `n` tokens."""
    clock.reset()
    start = time.perf_counter()
    with torch.inference_mode():
        out = generate(ids, max_new_tokens=n, min_new_tokens=n)
    end = time.perf_counter()
    decode = None if clock.mark is None else (end - clock.mark) * 1e3
    return (end - start) * 1e3, decode, out


class ContentionGuard:
    """Re-runs a timed call that lost CPU to other processes: one whose CPU share (process CPU time, all threads,
    over wall time) fell below `floor` x the median share of the earlier calls of its kind (thread count, 1 or
    n tokens), up to `retries` times; a call still low after them is kept and counted."""

    def __init__(self, floor: float = 0.7, retries: int = 2, warmup: int = 3) -> None:
        self.floor, self.retries, self.warmup = floor, retries, warmup
        self.shares: dict[tuple[int, int], list[float]] = {}
        self.reruns = 0
        self.kept_low = 0

    def call(self, threads: int, generate: GenerateFn, ids: torch.Tensor, n: int,
             clock: SecondForwardClock) -> tuple[float, float | None, torch.Tensor]:
        """`timed_call(generate, ids, n, clock)`, re-run while its CPU share is low for its kind."""
        history = self.shares.setdefault((threads, n), [])
        for attempt in range(self.retries + 1):
            cpu = time.process_time()
            result = timed_call(generate, ids, n, clock)
            share = (time.process_time() - cpu) * 1e3 / result[0]
            if len(history) < self.warmup or share >= self.floor * statistics.median(history):
                history.append(share)
                return result
            if attempt < self.retries:
                self.reruns += 1
        self.kept_low += 1
        return result

    def summary(self) -> str:
        shares = ", ".join(f"{t}t/{k} token{'s' if k > 1 else ''} {statistics.median(v):.2f}"
                           for (t, k), v in sorted(self.shares.items()) if v)
        return (f"Contention guard: {self.reruns} timed call(s) re-run for a CPU share below {self.floor}x the median "
                f"of their kind, {self.kept_low} kept still low after {self.retries} re-runs; median CPU share "
                f"(process CPU time / wall time): {shares}.")


@dataclass
class Samples:
    """Timings of one (thread count, variant, prompt) over the repeats, and the outputs of its full calls."""

    ttft_ms: list[float] = field(default_factory=list)  # two-call variants: t(1)
    full_ms: list[float] = field(default_factory=list)  # t(n)
    in_call_ms: list[float] = field(default_factory=list)  # decode time inside the t(n) call
    outputs: list[torch.Tensor] = field(default_factory=list)

    def decode_ms(self, two_call: bool) -> float:
        if two_call:
            return statistics.median(self.full_ms) - statistics.median(self.ttft_ms)
        return statistics.median(self.in_call_ms)


SampleMap = dict[tuple[int, str, str], Samples]


def measure(model: Any, variants: list[Variant], prompts: list[Prompt], threads: list[int], n: int,
            repeats: int, guard: ContentionGuard) -> SampleMap:
    """Interleaved repeats (threads, then prompts, then variants in a rotating order)."""
    samples: SampleMap = {}
    timers = timed_proposals(variants)
    clock = SecondForwardClock(model)
    warm = prompts[0].ids[:, -64:]
    for t in threads:
        use_cpu_threads(t)
        for v in variants:  # each variant's first-call costs, outside the readings
            timed_call(v.generate, warm, 4, clock)
    for repeat in range(repeats):
        started = time.perf_counter()
        for t in threads:
            use_cpu_threads(t)
            for k, p in enumerate(prompts):
                shift = (repeat * len(prompts) + k) % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    cell = samples.setdefault((t, v.name, p.label), Samples())
                    if v.name in timers:
                        timers[v.name].sink = v.draft_ms.setdefault(t, [])
                    if v.two_call:
                        cell.ttft_ms.append(guard.call(t, v.generate, p.ids, 1, clock)[0])
                    full, in_call, out = guard.call(t, v.generate, p.ids, n, clock)
                    cell.full_ms.append(full)
                    if in_call is not None:
                        cell.in_call_ms.append(in_call)
                    cell.outputs.append(out)
                    if v.handle is not None and (t, p.label) not in v.accepted:
                        v.accepted[(t, p.label)] = list(v.handle.last_stats.accepted_per_step)
                    if v.name in timers:
                        timers[v.name].sink = None
                print(progress(samples, variants, t, p, n), file=sys.stderr, flush=True)
        print(f"repeat {repeat + 1}/{repeats}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    clock.remove()
    return samples


def progress(samples: SampleMap, variants: list[Variant], t: int, prompt: Prompt, n: int) -> str:
    """One stderr line per (threads, prompt) as it completes: every variant's tok/s so far (a partial record)."""
    cells = [f"{v.name}={(n - 1) / (samples[(t, v.name, prompt.label)].decode_ms(v.two_call) / 1e3):.2f}"
             for v in variants]
    return f"[{t}t {prompt.label}, {prompt.ids.shape[1]} tokens] " + "; ".join(cells)


def mismatched(samples: SampleMap, t: int, name: str, label: str, dense: str) -> bool:
    """Whether any full call of `name` on prompt `label` at `t` threads differs from dense's first output."""
    reference = samples[(t, dense, label)].outputs[0]
    return any(not torch.equal(out, reference) for out in samples[(t, name, label)].outputs)


def group_tps(samples: SampleMap, t: int, name: str, prompts: list[Prompt], n: int, two_call: bool) -> float:
    """Decode tokens/s of a variant over `prompts`: their decoded tokens over their decode time."""
    total_ms = sum(samples[(t, name, p.label)].decode_ms(two_call) for p in prompts)
    return len(prompts) * (n - 1) / (total_ms / 1e3)


def table(samples: SampleMap, variants: list[Variant], prompts: list[Prompt], t: int,
          n: int) -> tuple[list[str], str, str]:
    """One thread count's Markdown rows, its fastest lossless variant, and the dense timing check."""
    groups = sorted({p.group for p in prompts}, key=["chat-prose", "chat-code", "passkey"].index)
    by_group = {g: [p for p in prompts if p.group == g] for g in groups}
    dense_name = variants[0].name
    dense = {(g, two): group_tps(samples, t, dense_name, ps, n, two) for g, ps in by_group.items()
             for two in (False, True)}
    dense_all = {two: group_tps(samples, t, dense_name, prompts, n, two) for two in (False, True)}
    head = ("| Variant | Decode tok/s | vs dense | " + " | ".join(f"{g} vs dense" for g in groups)
            + " | Accepted/step (mean) | Mismatches |")
    rows = [head, "|---|---:|---:|" + "---:|" * len(groups) + "---:|---:|"]
    best: tuple[float, str] | None = None
    depth_rows = []
    for v in variants:
        two = v.two_call and v is not variants[0]  # dense's row: the one-call figure, like this project's rows
        tps = group_tps(samples, t, v.name, prompts, n, two)
        ratios = " | ".join(f"{group_tps(samples, t, v.name, ps, n, two) / dense[(g, two)]:.2f}x"
                            for g, ps in by_group.items())
        steps = [a for (threads, _), per_step in v.accepted.items() if threads == t for a in per_step]
        accepted = f"{statistics.mean(steps):.2f}" if steps else ""
        mismatches = sum(mismatched(samples, t, v.name, p.label, dense_name) for p in prompts)
        rows.append(f"| {v.name}{' (two-call timing)' if two else ''} | {tps:.1f} | {tps / dense_all[two]:.2f}x | "
                    f"{ratios} | {accepted} | {mismatches}/{len(prompts)} |")
        if v.draft_ms.get(t):
            depth_rows.append(f"| {v.name} | {statistics.median(v.draft_ms[t]):.1f} | "
                              f"{', '.join(f'{a:.2f}' for a in acceptance_by_depth(steps))} |")
        if mismatches == 0 and (best is None or tps / dense_all[two] > best[0]):
            best = (tps / dense_all[two], f"{v.name} ({tps:.1f} tok/s, {tps / dense_all[two]:.2f}x dense)")
    check = (f"dense {dense_all[False]:.2f} tok/s timed inside one call, {dense_all[True]:.2f} tok/s by two calls "
             f"({dense_all[False] / dense_all[True] - 1:+.1%})")
    if depth_rows:
        rows += ["", "| Eagle variant | Drafting ms per step (median) | Acceptance by depth (alpha_1, alpha_2, ...) |",
                 "|---|---:|---|", *depth_rows]
    return rows, "none" if best is None else best[1], check


def identity_check(model: Any, tokenizer: Any, variant: Variant, dense: Variant, n: int, new_tokens: int,
                   n_chars: int) -> str:
    """Greedy identity of `variant` against dense on `n` more chat prompts (untimed)."""
    chat = dataclasses.replace(get_task("chat"), n_chars=n_chars)
    same = 0
    for i, r in enumerate(chat.requests(n, seed=SEED + 1)):
        ids = prompt_ids(tokenizer, r.prompt, chat=True)
        with torch.inference_mode():
            a = variant.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            b = dense.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        same += bool(torch.equal(a, b))
        if (i + 1) % 25 == 0:
            print(f"identity: {same}/{i + 1}", file=sys.stderr, flush=True)
    return (f"Greedy identity, {variant.name}: {same}/{n} further chat prompts (seed {SEED + 1}, {new_tokens} new "
            "tokens each) identical to dense token for token.")


def _selected(name: str, only: str | None, skip: str | None) -> bool:
    """Whether variant `name` passes `--only` (a substring of it listed) and `--skip` (none listed)."""
    def keys(text: str | None) -> list[str]:
        return [k.strip() for k in (text or "").split(";") if k.strip()]  # variant names hold commas

    return (not only or any(k in name for k in keys(only))) and not any(k in name for k in keys(skip))


def header(args: argparse.Namespace, prompts: list[Prompt], n_layers: int) -> list[str]:
    """The Markdown header: device, date, versions, command, workload."""
    from profilers.device import current_cpu

    cpu = current_cpu()
    lengths: dict[str, list[int]] = {}
    for p in prompts:
        lengths.setdefault(p.group, []).append(int(p.ids.shape[1]))
    shapes = "; ".join(f"{g}: {len(v)} prompts, {min(v)}-{max(v)} tokens (mean {statistics.mean(v):.0f})"
                       for g, v in lengths.items())
    return [
        f"### Speculative decoding on {MODEL}, {dt.date.today().isoformat()}",
        "",
        f"Device: {cpu.fields.get('model') or cpu.name} ({cpu.fields.get('cores_available', '?')} cores available), "
        f"threads {args.threads}. Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; float32, greedy, batch 1, chat template, {n_layers} layers.",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        f"Prompts (seed {SEED}): {shapes}. {args.new_tokens} new tokens per call (EOS suppressed). Decode tok/s = "
        f"(new_tokens - 1) / decode time, each time the median of {args.repeats} interleaved repeat(s); decode time "
        "= from the start of the model's second forward (prefill done, first token picked) to the end of the call, "
        "or, for HF prompt lookup (its first forward also verifies candidates), t(new_tokens) - t(1) over two "
        "calls, compared with dense timed the same way. A group's tok/s is its total decoded tokens over its total "
        "decode time. Mismatches: prompts where a timed output differed from dense greedy output, token for token "
        "(lossless requires 0).",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12, help="chat prompts (task `chat`)")
    ap.add_argument("--passkey", type=int, default=2, help="passkey prompts (task `passkey`, ~1.1k tokens)")
    ap.add_argument("--chars", type=int, default=1200, help="characters of each chat prompt's passage")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts, one table each")
    ap.add_argument("--only", default=None, help="';'-separated substrings: bench only variants matching one "
                                                 "(dense always runs)")
    ap.add_argument("--skip", default=None, help="';'-separated substrings: leave out variants matching one")
    ap.add_argument("--no-eagle", action="store_true", help="leave out the eagle drafter's variants")
    ap.add_argument("--policy", type=Path, action="append", default=[], help="a tuned policy to add (repeatable)")
    ap.add_argument("--identity", type=int, default=0, help="then check greedy identity on this many more prompts")
    ap.add_argument("--identity-tokens", type=int, default=32)
    ap.add_argument("--identity-of", default=None, help="check identity for the fastest lossless variant whose "
                                                         "name holds this substring (default: the fastest of all)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]
    started = time.perf_counter()
    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = build_prompts(tokenizer, args.prompts, args.passkey, args.chars)
    from tuner.models import default_draft_head

    head = None if args.no_eagle else default_draft_head(MODEL)
    extra = eagle_sections(head, int(model.config.vocab_size)) if head else {}
    extra.update(policy_sections(args.policy))
    variants = build_variants(model, tokenizer.pad_token_id or tokenizer.eos_token_id or 0, extra)
    variants = variants[:1] + [v for v in variants[1:] if _selected(v.name, args.only, args.skip)]
    guard = ContentionGuard()
    samples = measure(model, variants, prompts, threads, args.new_tokens, args.repeats, guard)
    lines = header(args, prompts, model.config.num_hidden_layers) + [guard.summary(), ""]
    dense_name = variants[0].name
    if len(threads) > 1:
        same = sum(all(torch.equal(samples[(t, dense_name, p.label)].outputs[0],
                                   samples[(threads[0], dense_name, p.label)].outputs[0]) for t in threads)
                   for p in prompts)
        lines += [f"Dense greedy output is identical at every thread count on {same}/{len(prompts)} prompts.", ""]
    bests = []
    for t in threads:
        rows, best, check = table(samples, variants, prompts, t, args.new_tokens)
        lines += [f"#### cpu:{t}t ({t} thread{'s' if t > 1 else ''})", "", *rows, "",
                  f"Best at {t}t: {best}. Timing check: {check}.", ""]
        bests.append(f"cpu:{t}t: {best}")
    if len(threads) > 1:
        lines += ["Best variant per device: " + "; ".join(bests) + ".", ""]
    if args.identity:
        use_cpu_threads(threads[0])
        fastest = max((v for v in variants[1:] if v.handle is not None and (args.identity_of or "") in v.name
                       and not any(mismatched(samples, threads[0], v.name, p.label, dense_name) for p in prompts)),
            key=lambda v: group_tps(samples, threads[0], v.name, prompts, args.new_tokens, False), default=None)
        if fastest is not None:
            lines += [identity_check(model, tokenizer, fastest, variants[0], args.identity, args.identity_tokens,
                                     args.chars), ""]
    lines.append(f"Wall time: {(time.perf_counter() - started) / 60:.1f} min.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
