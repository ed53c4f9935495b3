"""Matplotlib figures for reports (Agg backend: reports are rendered on headless machines)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_latency_bars(layers: pd.DataFrame, path: Path) -> Path:
    """Latency per part (embedding, each decoder layer, norm, head) as bars."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(layers)), layers["latency_ms"], color="#4477aa")
    ax.set_xticks(range(len(layers)), layers["name"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("latency (ms)")
    ax.set_title("per-layer latency")
    return _save(fig, path)


def latency_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Decoder-layer latency against token count, one panel per mode (median over layers, min-max band)."""
    modes = list(dict.fromkeys(curves["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.2), squeeze=False)
    layer_rows = curves[curves["part"].astype(str).str.contains("layer")] if "part" in curves else curves
    if layer_rows.empty:
        layer_rows = curves
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = layer_rows[layer_rows["mode"] == mode]
        x = "n_query_tokens" if mode == "prefill" else "n_kv_tokens"
        stats = rows.groupby(x)["latency_ms"].agg(["median", "min", "max"]).reset_index()
        ax.plot(stats[x], stats["median"], marker="o")
        ax.fill_between(stats[x], stats["min"], stats["max"], alpha=0.2)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel("decoder layer latency (ms)")
        ax.set_title(mode)
    return _save(fig, path)


def pareto(trials: pd.DataFrame, metric: str, quality: str, path: Path) -> Path:
    """Objective vs quality for every completed trial; Pareto front joined; presets labelled."""
    done = trials[trials[metric].notna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(done[metric], done[quality], color="#bbbbbb", label="trials")
    if "pareto" in done:
        front = done[done["pareto"].astype(bool)].sort_values(metric)
        ax.plot(front[metric], front[quality], color="#cc3311", marker="o", label="Pareto front")
    if "preset" in done:
        for _, row in done[done["preset"].notna()].iterrows():
            ax.annotate(str(row["preset"]).split(":")[-1], (row[metric], row[quality]), fontsize=7)
            ax.scatter([row[metric]], [row[quality]], marker="s", color="#228833")
    ax.set_xlabel(metric)
    ax.set_ylabel(quality)
    ax.legend(fontsize=8)
    return _save(fig, path)


def predicted_vs_measured(trials: pd.DataFrame, metric: str, path: Path) -> Path:
    """Cost-model prediction against the measured objective (identity line for reference)."""
    rows = trials[trials["predicted_ms"].notna() & trials[metric].notna()]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(rows["predicted_ms"], rows[metric])
    lo = float(min(rows["predicted_ms"].min(), rows[metric].min()))
    hi = float(max(rows["predicted_ms"].max(), rows[metric].max()))
    ax.plot([lo, hi], [lo, hi], color="#999999", linestyle="--")
    ax.set_xlabel("predicted (ms)")
    ax.set_ylabel(f"measured {metric}")
    return _save(fig, path)


def _per_layer(series: dict[str, list[float]], ylabel: str, path: Path, step: bool) -> Path:
    """One line per named per-layer series, the tuned one highlighted."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        style = {"linewidth": 2.5, "color": "#cc3311"} if name == "tuned" else {"linestyle": "--"}
        if step:
            ax.step(range(len(values)), values, where="mid", marker="o", label=name, **style)
        else:
            ax.plot(range(len(values)), values, marker="o", label=name, **style)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return _save(fig, path)


def keep_schedules(schedules: dict[str, list[float]], path: Path) -> Path:
    """Token-retention schedules: fraction of prompt tokens each layer keeps, tuned vs presets."""
    return _per_layer(schedules, "fraction of prompt kept", path, step=True)


def verify_curves(rows: pd.DataFrame, path: Path) -> Path:
    """Speculative decoding's hardware profile: forward latency against tree tokens, per model and KV length."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (model, n_kv), group in rows.groupby(["model", "n_kv"]):
        group = group.sort_values("n_query")
        ax.plot(group["n_query"], group["ms"], marker="o", label=f"{model}, {n_kv} KV tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the forward (tree size + 1)")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def sparsity_levels(levels: dict[str, list[float]], path: Path) -> Path:
    """Per-layer activation-sparsity levels (mean over projection groups), tuned vs presets."""
    return _per_layer(levels, "fraction of input channels zeroed", path, step=False)


def kernel_break_even(rows: pd.DataFrame, path: Path) -> Path:
    """Sparse kernel time relative to the dense GEMV, per projection group, against sparsity (< 1: it pays)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    first = rows[rows["layer"] == rows["layer"].min()]
    for (group, kernel), frame in first[first["kernel"] != "dense"].groupby(["group", "kernel"]):
        dense = first[(first["group"] == group) & (first["kernel"] == "dense")].set_index("sparsity")["us"]
        frame = frame.sort_values("sparsity")
        ax.plot(frame["sparsity"], frame["us"].to_numpy() / dense.loc[frame["sparsity"]].to_numpy(), marker="o",
                label=f"{group} ({int(frame['out_features'].iloc[0])}x{int(frame['in_features'].iloc[0])}), {kernel}")
    ax.axhline(1.0, color="#999999", linestyle="--")
    ax.set_xlabel("input sparsity")
    ax.set_ylabel("kernel time / dense time")
    ax.legend(fontsize=6)
    return _save(fig, path)
