"""Checkpoints a policy names (draft models) resolve without the runtime importing the tuner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policies.checkpoints import CheckpointError, resolve_checkpoint


def test_builtin_names_resolve_through_the_entry_point_in_a_fresh_process() -> None:
    code = ("import sys; from policies.checkpoints import resolve_checkpoint; "
            "assert 'tuner' not in sys.modules; p = resolve_checkpoint('builtin:tiny-draft'); "
            "print((p / 'config.json').is_file())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_unknown_prefixes_and_missing_directories_get_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no resolver for hub: checkpoints .*autotune.checkpoint_resolvers"):
        resolve_checkpoint("hub:org/model")
    with pytest.raises(CheckpointError, match="not found: a local Hugging Face directory"):
        resolve_checkpoint(str(tmp_path / "nothing-here"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
