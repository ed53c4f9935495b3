"""`autotune report`: Markdown and HTML from what `profile` and `tune` wrote.

Inputs it understands:
- a `profile --out` directory (profile.json, curves.csv);
- a policy YAML, with its artefacts directory beside it (`<device-id>.d/`: profile.csv, trials.csv);
- a policy store directory (every `<model-slug>/<device-id>.yaml` in it).
Figures are PNGs written beside the report (linked from Markdown, embedded in the HTML so it travels
as one file).
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from policies.io import read_policy_dict
from reports import figures


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def _profile_section(profile: dict[str, Any], curves: pd.DataFrame | None, fig_dir: Path, stem: str) -> Section:
    layers = pd.DataFrame(profile["layers"])
    section = Section(f"Per-layer profile: {profile['model']} ({profile['mode']})")
    section.paragraphs.append(
        f"Device `{profile['device'].get('id')}`; sum of parts {profile['total_latency_ms']:.3f} ms"
        + (f", whole forward {profile['unhooked_latency_ms']:.3f} ms (fidelity {profile.get('fidelity', 0):.3f})"
           if "unhooked_latency_ms" in profile else "")
        + (f", hook overhead {profile['hook_overhead_pct']:.1f}%" if "hook_overhead_pct" in profile else "") + ".")
    cols = [c for c in ("index", "name", "latency_ms", "memory_mb", "activation_mb", "param_mb") if c in layers]
    section.tables.append(layers[cols])
    section.images.append(figures.layer_latency_bars(layers, fig_dir / f"{stem}-layers.png"))
    if curves is not None and len(curves):
        section.images.append(figures.latency_curves(curves, fig_dir / f"{stem}-curves.png"))
    return section


def _policy_sections(policy_file: Path, fig_dir: Path) -> list[Section]:
    doc = read_policy_dict(policy_file)  # a clear one-line PolicyError for a broken file
    stem = f"{policy_file.parent.name}-{policy_file.stem}"
    section = Section(f"Policy {policy_file.parent.name}/{policy_file.name}")
    objective = doc.get("objective", {})
    met = objective.get("budget_met")
    section.paragraphs.append(
        f"Model `{doc['model']['id']}` on device `{doc['device']['id']}`; objective {objective.get('metric')} "
        f"({objective.get('direction')}) with a {objective.get('quality_metric')} budget of "
        f"{objective.get('quality_budget')} points"
        + ("" if met is None else (": budget met." if met else ": **budget NOT met, best-effort policy**.")))
    measured = doc.get("measured") or {}
    if measured:
        section.tables.append(pd.DataFrame([dict(variant=k, **v) for k, v in measured.items()]))
    section.paragraphs.append("Techniques:\n\n```yaml\n" + yaml.safe_dump(doc.get("techniques", {}),
                                                                           sort_keys=False) + "```")
    sections = [section]
    artefacts = policy_file.with_suffix(".d")
    if (artefacts / "profile.csv").is_file():
        curves = pd.read_csv(artefacts / "profile.csv")
        curve_section = Section("Per-layer profile and latency curves on this device")
        prefill = curves[curves["mode"] == "prefill"]
        if len(prefill) and "name" in prefill:
            largest = prefill[prefill["n_query_tokens"] == prefill["n_query_tokens"].max()]
            curve_section.paragraphs.append(f"Per-layer prefill latency at {int(largest['n_query_tokens'].iloc[0])} "
                                            "tokens.")
            curve_section.images.append(figures.layer_latency_bars(largest, fig_dir / f"{stem}-layers.png"))
        curve_section.images.append(figures.latency_curves(curves, fig_dir / f"{stem}-curves.png"))
        sections.append(curve_section)
    if (artefacts / "speculative-verify.csv").is_file():
        verify = pd.read_csv(artefacts / "speculative-verify.csv")
        verify_section = Section("Speculative decoding: verify and draft forward latency on this device")
        verify_section.paragraphs.append(
            "How a forward's latency grows with the number of tree tokens decides which trees pay on this device "
            "(the cost model's input, measured by `search_spaces.speculative_profiler`).")
        verify_section.images.append(figures.verify_curves(verify, fig_dir / f"{stem}-verify.png"))
        sections.append(verify_section)
    if (artefacts / "sparsity-kernels.csv").is_file():
        kernels = pd.read_csv(artefacts / "sparsity-kernels.csv")
        kernel_section = Section("Sparse kernels vs dense on this device (break-even)")
        kernel_section.paragraphs.append(
            "Time of one batch-1 product with only the kept input channels' weight rows, relative to the dense "
            "GEMV, per projection group (measured by `search_spaces.sparsity_profiler`); below 1 the kernel pays.")
        kernel_section.images.append(figures.kernel_break_even(kernels, fig_dir / f"{stem}-kernels.png"))
        sections.append(kernel_section)
    tuned_sparsity = (doc.get("techniques") or {}).get("sparsity")
    if tuned_sparsity and tuned_sparsity.get("levels"):
        levels = {"tuned": [sum(row) / len(row) for row in tuned_sparsity["levels"]]}
        level_section = Section("Activation sparsity per layer")
        level_section.images.append(figures.sparsity_levels(levels, fig_dir / f"{stem}-sparsity.png"))
        sections.append(level_section)
    if (artefacts / "trials.csv").is_file():
        trials = pd.read_csv(artefacts / "trials.csv")
        schedules = _keep_schedules(doc, trials)
        if schedules:
            schedule_section = Section("Token-retention schedule per layer")
            schedule_section.images.append(figures.keep_schedules(schedules, fig_dir / f"{stem}-schedule.png"))
            sections.append(schedule_section)
        metric, quality = objective.get("metric", "latency_ms"), objective.get("quality_metric", "accuracy")
        trial_section = Section(f"Trials ({len(trials)})")
        trial_section.tables.append(trials.drop(columns=[c for c in ("params", "sections") if c in trials]))
        if metric in trials and quality in trials and trials[metric].notna().any():
            trial_section.images.append(figures.pareto(trials, metric, quality,
                                                       fig_dir / f"{stem}-pareto.png"))
        if "predicted_ms" in trials and trials["predicted_ms"].notna().any():
            # Cost hooks predict a latency: the objective itself, or end-to-end latency for tokens/s.
            predicted_metric = metric if metric.endswith("_ms") else "latency_ms"
            if predicted_metric in trials and trials[predicted_metric].notna().any():
                trial_section.images.append(figures.predicted_vs_measured(trials, predicted_metric,
                                                                          fig_dir / f"{stem}-predicted.png"))
        sections.append(trial_section)
    return sections


def _keep_schedules(doc: dict[str, Any], trials: pd.DataFrame) -> dict[str, list[float]]:
    """The tuned keep schedule and those of the preset trials (from their recorded sections)."""
    tuned = (doc.get("techniques") or {}).get("token_retention")
    if not tuned:
        return {}
    schedules = {"tuned": list(tuned["keep"])}
    if "sections" in trials and "preset" in trials:
        for _, row in trials[trials["preset"].notna()].iterrows():
            sections = json.loads(row["sections"]) if isinstance(row["sections"], str) else None
            section = (sections or {}).get("token_retention")
            if section:
                schedules[str(row["preset"]).split(":")[-1]] = list(section["keep"])
    return schedules


def collect_sections(path: Path, fig_dir: Path) -> list[Section]:
    """Everything reportable under `path`; ValueError if there is nothing."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"{path}: expected a policy .yaml file or a directory")
        return _policy_sections(path, fig_dir)
    sections: list[Section] = []
    if (path / "profile.json").is_file():
        profile = json.loads((path / "profile.json").read_text())
        curves = pd.read_csv(path / "curves.csv") if (path / "curves.csv").is_file() else None
        sections.append(_profile_section(profile, curves, fig_dir, "profile"))
    for policy_file in sorted([*path.glob("*/*.yaml"), *path.glob("*.yaml")]):
        sections.extend(_policy_sections(policy_file, fig_dir))
    if not sections:
        raise ValueError(f"{path}: no profile.json or policy files to report on")
    return sections


def render_markdown(title: str, sections: list[Section], base: Path) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for t in s.tables:
            out += [t.to_markdown(index=False, floatfmt=".3f"), ""]
        for img in s.images:
            out += [f"![{img.stem}]({os.path.relpath(img, base)})", ""]
    return "\n".join(out)


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        for p in s.paragraphs:
            if p.startswith("Techniques:"):
                code = p.split("```yaml\n", 1)[1].rsplit("```", 1)[0]
                body.append(f"<p>Techniques:</p><pre>{html.escape(code)}</pre>")
            else:
                body.append(f"<p>{html.escape(p)}</p>")
        for t in s.tables:
            body.append(t.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-", border=0))
        for img in s.images:
            data = base64.b64encode(img.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(img.stem)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(path: Path, out: Path | None = None) -> list[Path]:
    """Write report.html and report.md (default: inside the directory / beside the file)."""
    if out is None:
        out = (path if path.is_dir() else path.parent) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.with_name(out.stem + "_figures")
    created = not fig_dir.exists()
    fig_dir.mkdir(exist_ok=True)
    try:
        sections = collect_sections(path, fig_dir)
    except Exception:
        if created and not any(fig_dir.iterdir()):
            fig_dir.rmdir()  # leave nothing behind for a report that was never written
        raise
    title = f"autotune report: {path}"
    md_path = out.with_suffix(".md")
    for target, text in ((md_path, render_markdown(title, sections, out.parent)),
                         (out, render_html(title, sections))):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return [out, md_path]
