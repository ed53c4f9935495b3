"""The prepared GPU check runs end to end on the CPU as `--dry-run` (the same steps, small sizes; CUDA-only
checks skipped by name), so the script is known to work before a GPU is ever lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHON": sys.executable}  # the script runs this interpreter, as CI's venv has it


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == ["fingerprint", "profile", "peak_memory", "verify_curve", "two_four",
                           "bench:token_retention", "bench:speculative", "bench:sparsity", "bench:weight_sparsity",
                           "bench:diffusion_blocks"]
    assert doc["dry_run"] is True and doc["summary"]["failed"] == []
    assert steps["two_four"]["status"] == "skipped" and "CUDA" in steps["two_four"]["detail"]
    assert all(s["status"] == "ok" for name, s in steps.items() if name != "two_four")
    assert steps["peak_memory"]["numbers"]["kind"] == "cpu_peak_tensors"
    assert all(p > 0 for p in steps["peak_memory"]["numbers"]["peak_mb"])
    assert set(steps["profile"]["numbers"]) == {"prefill", "decode"}
    for name, step in steps.items():
        if name.startswith("bench:"):
            rows = step["numbers"]["rows"]
            assert rows[0]["name"] == "dense" and any(r["name"] == "policy" for r in rows)
            assert all(r["peak_memory_mb"] and r["peak_memory_mb"] > 0 for r in rows)
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## GPU check (dry run on the CPU)") and "| bench:speculative | ok |" in md


def test_without_cuda_and_without_dry_run_it_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gpu_check: no CUDA device here; use --dry-run on a CPU machine"]
