"""What a user sees: `autotune run` and `autotune bench` print no warning or deprecation line caused by our own
calls (transformers' FutureWarnings about the cache keyword, its logger's notes about generation settings we
pass to assisted generation, torch's beta notices). Run as separate processes with Python's default warning
filters, the way a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from policies import model_fingerprint, policy_from_dict, save_policy
from policies.testing import make_policy_dict
from profilers.device import resolve_device
from tuner.models import load_model

REPO = Path(__file__).resolve().parents[1]
# Python warnings ("FutureWarning: ...", "UserWarning: ..."), deprecation notes and transformers' logger lines.
# Our own advice ("autotune: warning: ...", "warning: no trial beat dense ...") is output, not noise.
NOISE = re.compile(r"\w*Warning\b|[Dd]eprecat|\[transformers\]")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def _noise(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]


def _policy(path: Path, model_id: str, sections: dict) -> Path:
    model = load_model(model_id).model
    doc = make_policy_dict(model_fingerprint(model), device=resolve_device(None).to_dict(), techniques=sections)
    doc["model"]["id"] = model_id
    doc["objective"]["quality_metric"] = "accuracy"
    save_policy(policy_from_dict(doc), path)
    return path


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """builtin:tiny with token retention and tree speculation by the draft model (the hooks, the cache keyword,
    our decode loop, and in bench Hugging Face's assisted generation and prompt lookup as peers); builtin:tiny-mdm
    with Fast-dLLM-style diffusion decoding over the block cache."""
    root = tmp_path_factory.mktemp("quiet")
    causal = {
        "token_retention": {"keep": [1.0, 1.0, 0.5, 0.5, 0.25, 0.25], "scorer": "attention", "window": 4,
                            "sinks": 4, "min_prompt_tokens": 32},
        "speculative": {"drafter": "draft_model", "draft_model": "builtin:tiny-draft",
                        "tree": {"kind": "static", "parents": [-1, 0, 1]}},
    }
    diffusion = {"diffusion_blocks": {"block_length": 8, "remasking": "low_confidence",
                                      "threshold": 0.9, "cache": "prefix"}}
    return {"builtin:tiny": _policy(root / "tiny.yaml", "builtin:tiny", causal),
            "builtin:tiny-mdm": _policy(root / "mdm.yaml", "builtin:tiny-mdm", diffusion)}


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-mdm"])
def test_run_prints_no_warning(policies, model):
    proc = _cli("run", "--model", model, "--policy", str(policies[model]), "--max-new-tokens", "8",
                "--prompt", "copy: owl fox bear owl fox bear owl fox bear owl fox bear owl fox bear owl fox |")
    assert proc.returncode == 0, proc.stderr
    assert _noise(proc) == []


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-mdm"])
def test_bench_prints_no_warning(policies, model):
    proc = _cli("bench", "--model", model, "--policy", str(policies[model]), "--repeats", "1",
                "--examples", "1", "--tasks", "pattern", "--prompt-tokens", "64", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    if model == "builtin:tiny":
        assert "peer:hf-assisted" in proc.stdout  # the peers ran, so their settings were checked too
    assert _noise(proc) == []


def test_tune_prints_no_warning(tmp_path):
    proc = _cli("tune", "--model", "builtin:tiny", "--techniques", "token_retention,speculative", "--budget", "1",
                "--objective", "tokens_per_s", "--prompt-tokens", "64", "--new-tokens", "4", "--repeats", "1",
                "--examples", "1", "--tasks", "pattern", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert _noise(proc) == []
