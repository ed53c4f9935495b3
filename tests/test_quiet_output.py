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
from tuner.models import load_model

REPO = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"warn|deprecat", re.IGNORECASE)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def _noise(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token retention and tree speculation with the draft model in one policy: the hooks, the cache keyword,
    our decode loop, and (in bench) Hugging Face's assisted generation and prompt lookup as peers."""
    model = load_model("builtin:tiny").model
    sections = {
        "token_retention": {"keep": [1.0, 1.0, 0.5, 0.5, 0.25, 0.25], "scorer": "attention", "window": 4,
                            "sinks": 4, "min_prompt_tokens": 32},
        "speculative": {"drafter": "draft_model", "draft_model": "builtin:tiny-draft",
                        "tree": {"kind": "static", "parents": [-1, 0, 1]}},
    }
    doc = make_policy_dict(model_fingerprint(model), techniques=sections)
    doc["model"]["id"] = "builtin:tiny"
    path = tmp_path_factory.mktemp("quiet") / "policy.yaml"
    save_policy(policy_from_dict(doc), path)
    return path


def test_run_prints_no_warning(policy_file):
    proc = _cli("run", "--model", "builtin:tiny", "--policy", str(policy_file), "--max-new-tokens", "8",
                "--prompt", "copy: owl fox bear owl fox bear owl fox bear owl fox bear owl fox bear owl fox |")
    assert proc.returncode == 0, proc.stderr
    assert _noise(proc) == []


def test_bench_prints_no_warning(policy_file):
    proc = _cli("bench", "--model", "builtin:tiny", "--policy", str(policy_file), "--repeats", "1",
                "--examples", "1", "--tasks", "pattern", "--prompt-tokens", "64", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "peer:hf-assisted" in proc.stdout  # the peers ran, so their settings were checked too
    assert _noise(proc) == []
