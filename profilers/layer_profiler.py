"""Per-layer latency and memory of a decoder-only model on one device, as curves over token counts.

Why per layer: the techniques autotune tunes act on layers (drop tokens after layer k, sparsify some
linears, draft with the first layers), so the cost model needs ``latency(part, n_query, n_kv)`` for each
part, not one number for the whole forward.

How: forward pre/post hooks on the token embedding, every decoder layer, the final norm and the LM head
record an interval per call (CUDA events on GPU, so no host sync perturbs the pipeline;
``perf_counter`` after a sync elsewhere).  Hooks are only installed for the *hooked* runs; the same
input is also run *without* hooks, interleaved with the hooked runs in the same process, so every
profile states how faithful it is:

* ``fidelity = sum(parts) / unhooked forward`` (what the parts miss: rotary, masks, Python glue,
  reported as ``other_ms``);
* ``hook_overhead_pct = (hooked - unhooked) / unhooked * 100``;
* ``fidelity_paired``: the median over hooked runs of *that run's* sum of parts, over the unhooked
  median.  On a quiet machine it equals ``fidelity``; under CPU contention per-part medians (which do
  not add) drift apart from the whole-forward median and only the paired figure stays meaningful, and
  ``noise_pct`` (IQR / median of the unhooked runs) says how busy the machine was.

Memory is measured in one extra hooked run so that the timed runs carry nothing but the timers: on CUDA
the peak allocated during each part above what was allocated before it; on CPU (where torch has no
allocator statistics) the bytes of the part's output activations plus its parameters.  Field names say
which (``memory_kind``).

Modes:

* ``prefill``: one forward over ``N`` prompt tokens into a fresh ``DynamicCache`` (``n_query = n_kv = N``);
* ``decode``: one step of ``n_query`` tokens (default 1) over a KV cache already holding ``N`` tokens
  (``n_kv_tokens = N`` = tokens cached *before* the step).  The cache is built once by a prefill and
  cropped back to ``N`` before every step, so repeats measure the same step.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import inspect
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from .hf_compat import cache_arg, hook_cache, new_dynamic_cache
from .model_parts import decoder_parts
from .timing import Timer, as_torch_device, synchronize

__all__ = [
    "CURVE_COLUMNS",
    "CurveInterpolator",
    "LayerRecord",
    "ModelProfile",
    "interpolate_forward_latency",
    "interpolate_latency",
    "load_curves",
    "profile_curves",
    "profile_model",
    "save_curves",
]

Mode = Literal["prefill", "decode"]
PartKind = Literal["embed", "decoder_layer", "norm", "lm_head"]

#: The columns every curves table has (the cost model's contract); extra columns may follow.
CURVE_COLUMNS: tuple[str, ...] = (
    "mode",
    "part",
    "layer_index",
    "n_query_tokens",
    "n_kv_tokens",
    "latency_ms",
    "memory_mb",
)

_MB = float(2**20)


@dataclass
class LayerRecord:
    """One profiled part.  ``index`` is the decoder-layer number, ``-1`` for embed/norm/lm_head."""

    name: str
    index: int
    kind: str
    latency_ms: float
    memory_mb: float
    activation_mb: float
    param_mb: float
    memory_kind: str
    samples_ms: list[float] = field(default_factory=list)
    calls: int = 1


@dataclass
class ModelProfile:
    """Result of :func:`profile_model`; all latencies are medians over ``repeats`` in milliseconds."""

    model_class: str
    mode: str
    n_tokens: int
    n_query_tokens: int
    n_kv_tokens: int
    batch_size: int
    device: str
    dtype: str
    timer: str
    memory_kind: str
    warmup: int
    repeats: int
    seed: int
    layers: list[LayerRecord]
    total_latency_ms: float
    unhooked_latency_ms: float
    hooked_latency_ms: float
    fidelity: float
    hook_overhead_pct: float
    other_ms: float
    noise_pct: float = 0.0
    parts_sum_median_ms: float = math.nan
    fidelity_paired: float = math.nan
    unhooked_samples_ms: list[float] = field(default_factory=list)
    hooked_samples_ms: list[float] = field(default_factory=list)

    def to_json_dict(
        self, device_dict: dict[str, Any] | None = None, model_id: str | None = None, samples: bool = False
    ) -> dict[str, Any]:
        """The ``autotune profile --json`` shape: ``{"device", "model", "mode", "layers", "total_latency_ms",
        ...}``.  ``device_dict`` is normally ``DeviceFingerprint.to_dict()``; per-repeat samples are
        left out unless ``samples`` because they make the JSON long without changing any decision."""
        layers = []
        for rec in self.layers:
            d = asdict(rec)
            if not samples:
                d.pop("samples_ms")
            layers.append(d)
        out: dict[str, Any] = {
            "device": dict(device_dict) if device_dict is not None else {"torch_device": self.device},
            "model": model_id if model_id is not None else self.model_class,
            "mode": self.mode,
            "layers": layers,
            "total_latency_ms": self.total_latency_ms,
            "unhooked_latency_ms": self.unhooked_latency_ms,
            "hooked_latency_ms": self.hooked_latency_ms,
            "fidelity": self.fidelity,
            "hook_overhead_pct": self.hook_overhead_pct,
            "other_ms": self.other_ms,
            "noise_pct": self.noise_pct,
            "parts_sum_median_ms": self.parts_sum_median_ms,
            "fidelity_paired": self.fidelity_paired,
            "n_tokens": self.n_tokens,
            "n_query_tokens": self.n_query_tokens,
            "n_kv_tokens": self.n_kv_tokens,
            "batch_size": self.batch_size,
            "model_class": self.model_class,
            "torch_device": self.device,
            "dtype": self.dtype,
            "timer": self.timer,
            "memory_kind": self.memory_kind,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "seed": self.seed,
        }
        if samples:
            out["unhooked_samples_ms"] = list(self.unhooked_samples_ms)
            out["hooked_samples_ms"] = list(self.hooked_samples_ms)
        return out

    def to_frame(self) -> pd.DataFrame:
        """Rows in the curves layout (one per part plus an ``other`` row; their sum is the unhooked
        forward)."""
        return pd.DataFrame(_curve_rows(self))


# --------------------------------------------------------------------------------------------------
# hooks


@dataclass
class _Part:
    name: str
    index: int
    kind: str
    module: nn.Module
    param_bytes: int


class _TimeRecorder:
    """Collects ``(start, stop)`` intervals per part for one forward (a part called twice sums)."""

    def __init__(self, n_parts: int, timer: Timer) -> None:
        self.timer = timer
        self.pending: list[list[Any]] = [[] for _ in range(n_parts)]
        self.intervals: list[list[tuple[Any, Any]]] = [[] for _ in range(n_parts)]

    def pre(self, i: int) -> None:
        self.pending[i].append(self.timer.start())

    def post(self, i: int, output: Any) -> None:
        if self.pending[i]:
            self.intervals[i].append(self.timer.stop(self.pending[i].pop()))

    def part_ms(self) -> list[float]:
        """Per-part milliseconds; only valid after the device was synchronised."""
        return [sum(Timer.elapsed_ms(iv) for iv in ivs) for ivs in self.intervals]


class _MemoryRecorder:
    """Per-part memory for one forward: CUDA peak delta where available, output bytes always."""

    def __init__(self, n_parts: int, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.before: list[int] = [0] * n_parts
        self.peak_bytes: list[int] = [0] * n_parts
        self.activation_bytes: list[int] = [0] * n_parts
        self.calls: list[int] = [0] * n_parts

    def pre(self, i: int) -> None:
        if self.cuda:
            # The caching allocator's counters are host-side: no sync needed to read or reset them.
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before[i] = torch.cuda.memory_allocated(self.device)

    def post(self, i: int, output: Any) -> None:
        self.calls[i] += 1
        self.activation_bytes[i] += _tensor_bytes(output)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - self.before[i]
            self.peak_bytes[i] = max(self.peak_bytes[i], int(peak))


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors in a module output (tensors, tuples, dicts, ModelOutputs); caches and other
    objects count zero because they are not this part's activations."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    return 0


@contextlib.contextmanager
def _hooks(parts: Sequence[_Part], recorder: _TimeRecorder | _MemoryRecorder) -> Iterator[None]:
    """Install pre/post hooks on every part for the duration of the block; always removed."""
    handles = []
    try:
        for i, part in enumerate(parts):

            def pre_hook(module: nn.Module, args: Any, _i: int = i) -> None:
                recorder.pre(_i)

            def post_hook(module: nn.Module, args: Any, output: Any, _i: int = i) -> None:
                recorder.post(_i, output)

            handles.append(part.module.register_forward_pre_hook(pre_hook))
            handles.append(part.module.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# inputs and caches


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def _new_cache(model: nn.Module) -> Any:
    """A fresh ``DynamicCache`` laid out for this model (sliding-window layers where the config says)."""
    return new_dynamic_cache(getattr(model, "config", None))


def _crop_cache(cache: Any, n_tokens: int) -> bool:
    """Crop ``cache`` back to ``n_tokens``; ``False`` where the cache cannot (a sliding-window layer past
    its window) and must be rebuilt.  transformers 5.x refuses positive ``crop`` arguments and takes the
    number of tokens to remove as a negative int, which 4.x also accepts."""
    current = cache.get_seq_length()
    if current == n_tokens:
        return True
    if current < n_tokens:
        return False
    try:
        cache.crop(n_tokens - current)
    except (RuntimeError, ValueError):
        return False
    return cache.get_seq_length() == n_tokens


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# profile_model


def profile_model(
    model: nn.Module,
    device: Any = None,
    mode: Mode = "prefill",
    n_tokens: int = 128,
    n_query: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    *,
    batch_size: int = 1,
    logits_to_keep: int | None = None,
    point_budget_s: float | None = None,
) -> ModelProfile:
    """Profile one forward of ``model`` part by part (see the module docstring for what is measured).

    ``device`` (a ``torch.device``, ``"cuda:0"``, a ``DeviceFingerprint`` or ``None`` for the model's own
    device) must be where the model's parameters already are: moving a model is the caller's decision.
    ``logits_to_keep`` is passed to the model when it accepts it (``1`` mimics ``generate``'s prefill,
    which only computes the last position's logits); by default the LM head runs over every position.
    ``point_budget_s`` caps the time this takes: when the first warm-up pair shows one forward is slow (a real
    model at thousands of tokens takes seconds on a CPU), the remaining warm-ups are skipped and the repeats cut
    to what fits, never below two (see `fit_repeats`).
    """
    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
    if n_tokens < 1 or n_query < 1 or batch_size < 1:
        raise ValueError("n_tokens, n_query and batch_size must be >= 1")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    model_dev = _model_device(model)
    dev = model_dev if device is None else as_torch_device(device)
    if not _same_device(dev, model_dev):
        raise ValueError(f"model parameters are on {model_dev} but profiling was asked on {dev}; move the model")

    mp = decoder_parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    raw = [(mp.embed, -1, "embed")]
    raw += [(layer, i, "decoder_layer") for i, layer in enumerate(mp.layers)]
    raw += [(mp.norm, -1, "norm"), (mp.lm_head, -1, "lm_head")]
    parts = [
        _Part(
            name=names.get(id(m), type(m).__name__),
            index=i,
            kind=k,
            module=m,
            param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()),
        )
        for m, i, k in raw
    ]

    vocab = getattr(mp.embed, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    gen = torch.Generator().manual_seed(seed)
    extra_kwargs: dict[str, Any] = {}
    if logits_to_keep is not None and _accepts(model, "logits_to_keep"):
        extra_kwargs["logits_to_keep"] = logits_to_keep

    timer = Timer(dev)
    was_training = model.training
    gc_was_enabled = gc.isenabled()
    model.eval()
    try:
        with torch.inference_mode():
            if mode == "prefill":
                n_q, n_kv = n_tokens, n_tokens
                step_ids = torch.randint(0, vocab, (batch_size, n_tokens), generator=gen).to(dev)

                def prepare() -> dict[str, Any]:
                    return {"input_ids": step_ids, **cache_arg(model, _new_cache(model)), "use_cache": True}

                def check(kw: dict[str, Any]) -> None:
                    return None

            else:
                n_q, n_kv = n_query, n_tokens
                ctx_ids = torch.randint(0, vocab, (batch_size, n_tokens), generator=gen).to(dev)
                step_ids = torch.randint(0, vocab, (batch_size, n_query), generator=gen).to(dev)
                state: dict[str, Any] = {"cache": None}

                def build() -> Any:
                    cache = _new_cache(model)
                    model(input_ids=ctx_ids, **cache_arg(model, cache), use_cache=True, **extra_kwargs)
                    return cache

                def prepare() -> dict[str, Any]:
                    if state["cache"] is None or not _crop_cache(state["cache"], n_tokens):
                        state["cache"] = None
                        state["cache"] = build()
                    return {"input_ids": step_ids, **cache_arg(model, state["cache"]), "use_cache": True}

                def check(kw: dict[str, Any]) -> None:
                    got = hook_cache(kw).get_seq_length()
                    if got != n_tokens + n_query:
                        raise RuntimeError(f"decode step left {got} cached tokens, expected {n_tokens + n_query}")

            def run(kw: dict[str, Any]) -> None:
                model(**kw, **extra_kwargs)

            gc.collect()
            gc.disable()  # a collection inside one timed run is noise the median need not absorb
            done = 0
            while done < warmup:
                started = time.perf_counter()
                run(prepare())
                with _hooks(parts, _TimeRecorder(len(parts), timer)):
                    run(prepare())
                synchronize(dev)
                done += 1
                if done == 1 and point_budget_s is not None:
                    warmup, repeats = fit_repeats(time.perf_counter() - started, warmup, repeats, point_budget_s)
            synchronize(dev)

            unhooked: list[float] = []
            hooked: list[float] = []
            per_part: list[list[float]] = [[] for _ in parts]
            for r in range(repeats):
                # Alternate the order so that drift (clocks, caches) hits both variants alike.
                for with_hooks in (False, True) if r % 2 == 0 else (True, False):
                    kw = prepare()
                    synchronize(dev)
                    if with_hooks:
                        rec = _TimeRecorder(len(parts), timer)
                        with _hooks(parts, rec):
                            t0 = timer.start()
                            run(kw)
                            iv = timer.stop(t0)
                        synchronize(dev)
                        hooked.append(Timer.elapsed_ms(iv))
                        for i, ms in enumerate(rec.part_ms()):
                            per_part[i].append(ms)
                    else:
                        t0 = timer.start()
                        run(kw)
                        iv = timer.stop(t0)
                        synchronize(dev)
                        unhooked.append(Timer.elapsed_ms(iv))
                    check(kw)
            if gc_was_enabled:
                gc.enable()

            mem = _MemoryRecorder(len(parts), dev)
            kw = prepare()
            synchronize(dev)
            with _hooks(parts, mem):
                run(kw)
            synchronize(dev)
            del kw
    finally:
        if gc_was_enabled:
            gc.enable()
        model.train(was_training)

    memory_kind = "cuda_peak_allocated" if dev.type == "cuda" else "cpu_activation_plus_params"
    records = []
    for i, part in enumerate(parts):
        act_mb = mem.activation_bytes[i] / _MB
        param_mb = part.param_bytes / _MB
        memory_mb = mem.peak_bytes[i] / _MB if dev.type == "cuda" else act_mb + param_mb
        records.append(
            LayerRecord(
                name=part.name,
                index=part.index,
                kind=part.kind,
                latency_ms=statistics.median(per_part[i]),
                memory_mb=memory_mb,
                activation_mb=act_mb,
                param_mb=param_mb,
                memory_kind=memory_kind,
                samples_ms=per_part[i],
                calls=mem.calls[i],
            )
        )
    total = sum(r.latency_ms for r in records)
    # Medians do not add: under CPU contention each part's median is its uncontended time while every
    # whole forward has some contended parts, so sum-of-medians / median-forward drifts below 1 even
    # though the hooks see everything.  The paired figure (median over hooked runs of that run's sum of
    # parts) compares like with like and separates "hooks miss time" from "the machine was busy".
    parts_sum_median = statistics.median(sum(per_part[i][r] for i in range(len(parts))) for r in range(repeats))
    unhooked_ms = statistics.median(unhooked)
    hooked_ms = statistics.median(hooked)
    first_param = next(model.parameters(), None)
    return ModelProfile(
        model_class=type(model).__name__,
        mode=mode,
        n_tokens=n_tokens,
        n_query_tokens=n_q,
        n_kv_tokens=n_kv,
        batch_size=batch_size,
        device=str(dev),
        dtype=str(first_param.dtype).replace("torch.", "") if first_param is not None else "unknown",
        timer="cuda_events" if timer.cuda else "perf_counter",
        memory_kind=memory_kind,
        warmup=warmup,
        repeats=repeats,
        seed=seed,
        layers=records,
        total_latency_ms=total,
        unhooked_latency_ms=unhooked_ms,
        hooked_latency_ms=hooked_ms,
        fidelity=total / unhooked_ms if unhooked_ms > 0 else math.nan,
        hook_overhead_pct=(hooked_ms - unhooked_ms) / unhooked_ms * 100.0 if unhooked_ms > 0 else math.nan,
        other_ms=unhooked_ms - total,
        noise_pct=_spread_pct(unhooked),
        parts_sum_median_ms=parts_sum_median,
        fidelity_paired=parts_sum_median / unhooked_ms if unhooked_ms > 0 else math.nan,
        unhooked_samples_ms=unhooked,
        hooked_samples_ms=hooked,
    )


def _spread_pct(samples: Sequence[float]) -> float:
    """Interquartile range of the un-hooked samples as % of their median: a profile taken while other
    processes fight for the cores shows tens of percent here, a clean one a few percent."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    med = statistics.median(samples)
    return (q3 - q1) / med * 100.0 if med > 0 else math.nan


# --------------------------------------------------------------------------------------------------
# curves


def _curve_rows(prof: ModelProfile) -> list[dict[str, Any]]:
    rows = []
    for rec in prof.layers:
        rows.append(
            {
                "mode": prof.mode,
                "part": rec.kind,
                "layer_index": rec.index,
                "n_query_tokens": prof.n_query_tokens,
                "n_kv_tokens": prof.n_kv_tokens,
                "latency_ms": rec.latency_ms,
                "memory_mb": rec.memory_mb,
                "name": rec.name,
                "activation_mb": rec.activation_mb,
                "param_mb": rec.param_mb,
                "memory_kind": rec.memory_kind,
                "batch_size": prof.batch_size,
                "unhooked_latency_ms": prof.unhooked_latency_ms,
            }
        )
    rows.append(
        {
            "mode": prof.mode,
            "part": "other",
            "layer_index": -1,
            "n_query_tokens": prof.n_query_tokens,
            "n_kv_tokens": prof.n_kv_tokens,
            "latency_ms": prof.other_ms,
            "memory_mb": math.nan,
            "name": "(unhooked - sum of parts)",
            "activation_mb": math.nan,
            "param_mb": math.nan,
            "memory_kind": prof.memory_kind,
            "batch_size": prof.batch_size,
            "unhooked_latency_ms": prof.unhooked_latency_ms,
        }
    )
    return rows


def fit_repeats(pair_s: float, warmup: int, repeats: int, budget_s: float) -> tuple[int, int]:
    """(warm-ups, repeats) for a grid point whose warm-up pair (one plain and one hooked forward) took ``pair_s``:
    unchanged when ``warmup + repeats`` pairs fit in ``budget_s``, else one warm-up and as many repeats as fit
    in the rest, at least one and at most ``repeats``. A forward of seconds varies by a few percent between
    runs, and a study's profile is only the shape its cost model scales to measured schedules."""
    if (warmup + repeats) * pair_s <= budget_s:
        return warmup, repeats
    return 1, max(1, min(repeats, int(budget_s / pair_s) - 1))


def profile_curves(
    model: nn.Module,
    device: Any = None,
    prefill_tokens: Iterable[int] = (64, 128, 256, 512),
    decode_kv_tokens: Iterable[int] = (128, 256, 512, 1024),
    decode_query_tokens: Iterable[int] = (1,),
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    *,
    batch_size: int = 1,
    progress: Callable[[str], None] | None = None,
    point_budget_s: float | None = None,
) -> pd.DataFrame:
    """Latency/memory per part over a grid of token counts, as a tidy DataFrame.

    One row per (mode, part, layer_index, n_query_tokens, n_kv_tokens) with the :data:`CURVE_COLUMNS`
    plus name, activation_mb, param_mb, memory_kind, batch_size and unhooked_latency_ms.  Each grid
    point also gets a ``part == "other"`` row (unhooked forward minus the parts: rotary, masks, glue), so
    the rows of one grid point sum to the measured whole forward.  Pass an empty grid to skip a mode.
    Prefill points run with ``logits_to_keep=1``, as ``generate``'s prefill does (on SmolLM2-135M the LM head over
    every row of a 512-token prompt is 220 of 1011 ms, work no generation does); decode points keep every query
    row's logits (a verify forward needs them all). ``point_budget_s``: see `profile_model`."""
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[Mode, int, int]] = [("prefill", int(n), int(n)) for n in prefill_tokens]
    jobs += [("decode", int(q), int(n)) for n in decode_kv_tokens for q in decode_query_tokens]
    for mode, n_q, n_tok in jobs:
        if progress is not None:
            progress(f"{mode} n_query={n_q} n_tokens={n_tok}")
        prof = profile_model(
            model,
            device,
            mode=mode,
            n_tokens=n_tok,
            n_query=n_q,
            warmup=warmup,
            repeats=repeats,
            seed=seed,
            batch_size=batch_size,
            # a prefill is priced as generate runs it: the LM head on the last position only
            logits_to_keep=1 if mode == "prefill" else None,
            point_budget_s=point_budget_s,
        )
        rows.extend(_curve_rows(prof))
    df = pd.DataFrame(
        rows,
        columns=[
            *CURVE_COLUMNS,
            "name",
            "activation_mb",
            "param_mb",
            "memory_kind",
            "batch_size",
            "unhooked_latency_ms",
        ],
    )
    return df.astype({"layer_index": "int64", "n_query_tokens": "int64", "n_kv_tokens": "int64"})


_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def save_curves(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write curves as CSV or Parquet (by suffix) atomically: a temp file in the same folder, then a
    rename, so a reader never sees half a file.  Returns the path written."""
    p = Path(path)
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"curves path {str(p)!r}: suffix must be .csv or .parquet")
    missing = [c for c in CURVE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"curves table is missing columns: {', '.join(missing)}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def load_curves(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`save_curves`; ``ValueError`` if it lacks the curve columns."""
    p = Path(path)
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"curves path {str(p)!r}: suffix must be .csv or .parquet")
    df = pd.read_csv(p) if fmt == "csv" else pd.read_parquet(p)
    missing = [c for c in CURVE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: not a curves table (missing {', '.join(missing)})")
    return df


# --------------------------------------------------------------------------------------------------
# interpolation


def _interp1d(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through the points, linear extrapolation from the end segments, constant for a
    single point.  Duplicated x values are averaged first."""
    pts: dict[float, list[float]] = {}
    for a, b in zip(xs, ys, strict=True):
        pts.setdefault(float(a), []).append(float(b))
    grid = sorted(pts)
    vals = [statistics.fmean(pts[g]) for g in grid]
    return _interp_sorted(grid, vals, float(x))


def _interp_sorted(grid: Sequence[float], vals: Sequence[float], x: float) -> float:
    if len(grid) == 1:
        return vals[0]
    j = bisect.bisect_right(grid, x) - 1
    j = min(max(j, 0), len(grid) - 2)
    x0, x1, y0, y1 = grid[j], grid[j + 1], vals[j], vals[j + 1]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if (x < grid[0] or x > grid[-1]) and min(vals) >= 0:
        y = max(0.0, y)  # extrapolating a positive cost below zero is never right
    return y


class CurveInterpolator:
    """Fast repeated predictions from one curves table (what a cost model inside an Optuna loop wants:
    the table is grouped once, each prediction is then a few bisections).

    Per (mode, part, layer_index) and per grid value of ``n_query_tokens``, ``column`` is piecewise-linear
    in ``n_kv_tokens``; those values are then piecewise-linear across ``n_query_tokens``.  On the prefill
    diagonal (``n_query == n_kv``) this is 1-D in tokens; for decode it is bilinear-like on the grid.
    Beyond the grid the end segments are extended linearly (held constant along an axis with a single
    grid value)."""

    def __init__(self, df: pd.DataFrame, column: str = "latency_ms") -> None:
        missing = [c for c in CURVE_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"curves table is missing columns: {', '.join(missing)}")
        self.column = column
        self.modes: set[str] = set(df["mode"].unique())
        self._names: dict[str, tuple[str, int]] = {}
        if "name" in df.columns:
            for name, part, idx in df[["name", "part", "layer_index"]].drop_duplicates().itertuples(index=False):
                self._names.setdefault(str(name), (str(part), int(idx)))
        self._curves: dict[tuple[str, str, int], list[tuple[float, list[float], list[float]]]] = {}
        keys = ["mode", "part", "layer_index", "n_query_tokens"]
        grouped: dict[tuple[str, str, int], dict[float, dict[float, list[float]]]] = {}
        for mode, part, idx, nq, nkv, val in df[[*keys, "n_kv_tokens", column]].itertuples(index=False):
            by_q = grouped.setdefault((str(mode), str(part), int(idx)), {})
            by_q.setdefault(float(nq), {}).setdefault(float(nkv), []).append(float(val))
        for key, by_q in grouped.items():
            rows = []
            for nq in sorted(by_q):
                kv_grid = sorted(by_q[nq])
                rows.append((nq, kv_grid, [statistics.fmean(by_q[nq][k]) for k in kv_grid]))
            self._curves[key] = rows

    def _pick_mode(self, part: str, n_query: float, n_kv: float) -> str:
        modes = {m for (m, p, _) in self._curves if p == part}
        if len(modes) == 1:
            return next(iter(modes))
        return "prefill" if n_query == n_kv and "prefill" in modes else "decode"

    def _one(self, key: tuple[str, str, int], n_query: float, n_kv: float) -> float:
        rows = self._curves[key]
        qs = [r[0] for r in rows]
        vals = [_interp_sorted(kv, ys, n_kv) for _, kv, ys in rows]
        return _interp_sorted(qs, vals, n_query)

    def latency(
        self,
        part: str,
        n_query_tokens: float,
        n_kv_tokens: float,
        *,
        layer_index: int | None = None,
        mode: str | None = None,
        reduce: Literal["mean", "sum"] = "mean",
    ) -> float:
        """See :func:`interpolate_latency`."""
        if not any(p == part for (_, p, _) in self._curves) and part in self._names:
            part, layer_index = self._names[part]
        if not any(p == part for (_, p, _) in self._curves):
            raise ValueError(f"no curve rows for part {part!r}")
        use_mode = mode or self._pick_mode(part, n_query_tokens, n_kv_tokens)
        keys = [k for k in self._curves if k[0] == use_mode and k[1] == part]
        if layer_index is not None:
            keys = [k for k in keys if k[2] == layer_index]
        if not keys:
            where = f" layer {layer_index}" if layer_index is not None else ""
            raise ValueError(f"no {use_mode!r} curve rows for part {part!r}{where}")
        values = [self._one(k, float(n_query_tokens), float(n_kv_tokens)) for k in keys]
        return float(sum(values) if reduce == "sum" else statistics.fmean(values))

    def forward(self, n_query_tokens: float, n_kv_tokens: float, *, mode: str | None = None) -> float:
        """Whole-forward prediction: every part and layer (``other`` included) interpolated and summed."""
        if mode is None:
            modes = self.modes
            use_mode = (
                next(iter(modes))
                if len(modes) == 1
                else ("prefill" if n_query_tokens == n_kv_tokens and "prefill" in modes else "decode")
            )
        else:
            use_mode = mode
        keys = [k for k in self._curves if k[0] == use_mode]
        if not keys:
            raise ValueError(f"no {use_mode!r} curve rows")
        return float(sum(self._one(k, float(n_query_tokens), float(n_kv_tokens)) for k in keys))


def interpolate_latency(
    df: pd.DataFrame,
    part: str,
    n_query_tokens: float,
    n_kv_tokens: float,
    *,
    layer_index: int | None = None,
    mode: str | None = None,
    column: str = "latency_ms",
    reduce: Literal["mean", "sum"] = "mean",
) -> float:
    """Predict ``column`` (latency by default) of one part at any token counts from a curves table.

    ``part`` is a kind (``"embed"``, ``"decoder_layer"``, ``"norm"``, ``"lm_head"``, ``"other"``) or a
    module name as in the ``name`` column.  With ``layer_index=None`` and several layers, each layer is
    interpolated and the results are averaged (``reduce="mean"``: a typical layer) or summed.
    ``mode=None`` picks prefill when ``n_query_tokens == n_kv_tokens`` and decode otherwise (or the only
    mode present).  Piecewise-linear inside the grid, linear extrapolation outside (see
    :class:`CurveInterpolator`, which is faster for many predictions from one table)."""
    return CurveInterpolator(df, column).latency(
        part, n_query_tokens, n_kv_tokens, layer_index=layer_index, mode=mode, reduce=reduce
    )


def interpolate_forward_latency(
    df: pd.DataFrame, n_query_tokens: float, n_kv_tokens: float, *, mode: str | None = None
) -> float:
    """Whole-forward latency: every part and layer (plus ``other``) interpolated and summed."""
    return CurveInterpolator(df).forward(n_query_tokens, n_kv_tokens, mode=mode)
