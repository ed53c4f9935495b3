"""The CLI as users drive it: exit codes, one-line errors, JSON shapes, and the tune -> run -> bench ->
report path on the built-in model (with the test-only `norm_scale` technique)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import toy_technique
from tuner.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST_TUNE = ["--prompt-tokens", "96", "--new-tokens", "4", "--repeats", "1", "--examples", "2",
             "--tasks", "pattern"]


@pytest.fixture(autouse=True)
def _toy_technique() -> None:
    toy_technique.register()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_devices_json_lists_the_cpu(capsys):
    code, out, _ = run_cli(capsys, "devices", "--json")
    devices = json.loads(out)
    assert code == 0
    cpu = [d for d in devices if d["kind"] == "cpu"]
    assert len(cpu) == 1 and {"id", "kind", "name"} <= set(cpu[0])
    assert cpu[0]["id"].startswith("cpu-")


def test_models_lists_builtin_tiny(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "builtin:tiny" in out


def test_profile_json_contract(capsys, tmp_path):
    code, out, err = run_cli(capsys, "profile", "--model", "builtin:tiny", "--tokens", "64", "--repeats", "2",
                             "--json", "--out", str(tmp_path))
    assert code == 0, err
    doc = json.loads(out)
    assert {"device", "model", "mode", "layers", "total_latency_ms"} <= set(doc)
    assert doc["model"] == "builtin:tiny" and doc["mode"] == "prefill"
    for layer in doc["layers"]:
        assert {"name", "index", "latency_ms", "memory_mb"} <= set(layer)
    assert abs(sum(la["latency_ms"] for la in doc["layers"]) - doc["total_latency_ms"]) < 1e-6
    assert (tmp_path / "profile.json").is_file() and (tmp_path / "curves.csv").is_file()
    code, out, _ = run_cli(capsys, "report", str(tmp_path))
    assert code == 0 and (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["profile", "--model", "builtin:nope"], "unknown built-in model 'builtin:nope'"),
    (["profile", "--model", "/no/such/dir"], "not found"),
    (["profile", "--device", "tpu:7"], "tpu:7"),
    (["tune", "--techniques", "warp_drive"], "unknown technique 'warp_drive'"),
    (["tune", "--techniques", "norm_scale", "--sampler", "cma"], "unknown sampler 'cma'"),
    (["tune", "--techniques", "norm_scale", "--quality-budget", "-1"], "--quality-budget"),
    (["tune", "--techniques", "norm_scale", "--tasks", "chess"], "chess"),
    (["tune", "--techniques", "norm_scale", "--budget", "0", *FAST_TUNE], "--budget"),
    (["run", "--policy", "/no/such.yaml", "--prompt", "x"], "/no/such.yaml"),
    (["report", "/no/such/dir"], "/no/such/dir"),
    (["profile", "--tokens", "0"], ">= 1"),
    (["profile", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["tune", "--techniques", "norm_scale", "--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, fragment):
    code, out, err = run_cli(capsys, *args, *(["--out", str(tmp_path)] if args[0] == "tune" else []))
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_argparse_errors_are_one_line_too():
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", "tune"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--techniques" in proc.stderr


@pytest.mark.parametrize("content, fragment", [
    ("a: [1, 2\n", "not valid YAML"),
    ("just a string\n", "mapping"),
    ("", "empty"),
])
def test_validate_rejects_broken_files_without_writing(capsys, tmp_path, content, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(capsys, "validate", str(bad))
    assert code == 2 and fragment in out and "Traceback" not in out + err
    assert len(out.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before and bad.read_text() == content


def test_validate_missing_path(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in out and len(out.strip().splitlines()) == 1


def test_tune_run_bench_report_end_to_end(capsys, tmp_path):
    out_dir = tmp_path / "store"
    code, out, err = run_cli(capsys, "tune", "--model", "builtin:tiny", "--techniques", "norm_scale",
                             "--budget", "3", "--out", str(out_dir), "--json", *FAST_TUNE)
    assert code == 0, err
    summary = json.loads(out)
    policy_file = Path(summary["policy"])
    assert policy_file.parent == out_dir / "builtin-tiny" and policy_file.suffix == ".yaml"
    assert summary["n_trials"] == 3
    doc = yaml.safe_load(policy_file.read_text())
    assert set(doc["measured"]) == {"baseline", "tuned"}
    assert doc["provenance"]["storage"].startswith("journal:")
    # The preset (factor 1.0 = dense) is enqueued first, so the study always has a feasible trial.
    assert doc["objective"]["budget_met"] is True
    assert (policy_file.with_suffix(".d") / "trials.csv").is_file()

    code, out, _ = run_cli(capsys, "validate", str(policy_file))
    assert code == 0 and out.strip().endswith("ok")

    code, out, err = run_cli(capsys, "run", "--model", "builtin:tiny", "--policies", str(out_dir),
                             "--prompt", "1, 2, 3, 4,", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == str(out_dir)

    code, out, err = run_cli(capsys, "bench", "--model", "builtin:tiny", "--policy", str(policy_file), "--json",
                             "--repeats", "1", "--examples", "2", "--tasks", "pattern", "--prompt-tokens", "64",
                             "--new-tokens", "3")
    assert code == 0, err
    bench = json.loads(out)
    assert [r["name"] for r in bench["results"]] == ["dense", "policy", "preset:identity"]
    for row in bench["results"]:
        assert {"name", "ttft_ms", "latency_ms", "tokens_per_s", "peak_memory_mb", "quality",
                "quality_metric"} <= set(row)
        assert row["quality_examples"] == 2
        if row["quality_metric"] == "accuracy":
            lo, hi = row["quality_ci95"]
            assert 0.0 <= lo <= row["quality"] <= hi <= 100.0
    assert {"device", "workload", "results"} <= set(bench)

    code, out, _ = run_cli(capsys, "report", str(out_dir))
    assert code == 0
    html = (out_dir / "report.html").read_text()
    assert "Pareto" in (out_dir / "report.md").read_text() or "pareto" in html
    assert "data:image/png;base64" in html

    # Resuming the same study with a larger budget runs only the missing trials.
    code, out, err = run_cli(capsys, "tune", "--model", "builtin:tiny", "--techniques", "norm_scale",
                             "--budget", "4", "--out", str(out_dir), "--json", *FAST_TUNE)
    assert code == 0, err
    assert json.loads(out)["n_trials"] == 4

    # Another workload is another study: its trials are not mixed with the first one's.
    other = [a if a != "4" else "5" for a in FAST_TUNE]  # --new-tokens 4 -> 5
    code, out, err = run_cli(capsys, "tune", "--model", "builtin:tiny", "--techniques", "norm_scale",
                             "--budget", "1", "--out", str(out_dir), "--json", *other)
    assert code == 0, err
    assert json.loads(out)["n_trials"] == 1


def test_run_refuses_a_policy_for_another_model(capsys, tmp_path):
    out_dir = tmp_path / "store"
    code, out, err = run_cli(capsys, "tune", "--model", "builtin:tiny", "--techniques", "norm_scale",
                             "--budget", "1", "--out", str(out_dir), "--json", *FAST_TUNE)
    assert code == 0, err
    policy_file = Path(json.loads(out)["policy"])
    doc = yaml.safe_load(policy_file.read_text())
    doc["model"]["fingerprint"]["num_layers"] += 1
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(doc))
    code, out, err = run_cli(capsys, "run", "--model", "builtin:tiny", "--policy", str(other), "--prompt", "x")
    assert code == 2 and "num_layers" in err and len(err.strip().splitlines()) == 1


def test_report_on_a_broken_policy_file_is_a_one_line_input_error(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    code, out, err = run_cli(capsys, "report", str(bad))
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]



def test_run_uses_a_speculative_policy_and_matches_dense(capsys, tmp_path):
    from policies import model_fingerprint, policy_from_dict, save_policy
    from policies.testing import make_policy_dict
    from tuner.models import load_model

    model = load_model("builtin:tiny").model
    section = {"drafter": "recycle", "recycle": {"k": 4}, "tree": {"kind": "static", "parents": [-1, -1, 0]},
               "prompt_lookup": {"depth": 3}}
    doc = make_policy_dict(model_fingerprint(model), techniques={"speculative": section})
    doc["model"]["id"] = "builtin:tiny"
    path = tmp_path / "spec.yaml"
    save_policy(policy_from_dict(doc), path)
    prompt = "cycle: red gold red gold red gold |"
    code, out, err = run_cli(capsys, "run", "--model", "builtin:tiny", "--policy", str(path), "--prompt", prompt,
                             "--max-new-tokens", "12", "--json")
    assert code == 0, err
    spec = json.loads(out)
    assert spec["speculative"]["steps"] >= 1
    (tmp_path / "empty").mkdir()  # no policy for this device: dense, with a warning
    code, out, err = run_cli(capsys, "run", "--model", "builtin:tiny", "--policies", str(tmp_path / "empty"),
                             "--prompt", prompt, "--max-new-tokens", "12", "--json")
    assert code == 0, err
    assert json.loads(out)["completion"] == spec["completion"]


def test_dtype_loads_the_model_in_it_and_is_the_workloads(capsys, tmp_path):
    code, out, err = run_cli(capsys, "profile", "--model", "builtin:tiny", "--dtype", "bf16", "--tokens", "32",
                             "--repeats", "1", "--json")
    assert code == 0, err
    code, out, err = run_cli(capsys, "bench", "--model", "builtin:tiny", "--dtype", "bfloat16", "--json",
                             "--repeats", "1", "--examples", "1", "--tasks", "pattern", "--prompt-tokens", "32",
                             "--new-tokens", "2")
    assert code == 0, err
    assert json.loads(out)["workload"]["dtype"] == "bfloat16"
    code, out, err = run_cli(capsys, "tune", "--model", "builtin:tiny", "--techniques", "norm_scale", "--dtype", "bf16",
                             "--budget", "1", "--out", str(tmp_path), "--json", *FAST_TUNE)
    assert code == 0, err
    bf16_file = Path(json.loads(out)["policy"])
    assert bf16_file.name.endswith(".bfloat16.yaml")  # beside, not over, the float32 policy of this device
    doc = yaml.safe_load(bf16_file.read_text())
    assert doc["workload"]["dtype"] == "bfloat16" and doc["model"]["fingerprint"]["dtype"] == "bfloat16"
    code, out, err = run_cli(capsys, "tune", "--model", "builtin:tiny", "--techniques", "norm_scale",
                             "--budget", "1", "--out", str(tmp_path), "--json", *FAST_TUNE)
    assert code == 0, err
    fp32_file = Path(json.loads(out)["policy"])
    assert fp32_file.parent == bf16_file.parent and fp32_file != bf16_file
    # one file: run takes the dtype it was tuned in; a store: the model's dtype picks the file
    code, out, err = run_cli(capsys, "run", "--model", "builtin:tiny", "--policy", str(bf16_file), "--prompt", "1, 2,",
                             "--max-new-tokens", "2")
    assert code == 0, err
    for dtype, want in (("bf16", bf16_file), ("float32", fp32_file)):
        code, out, err = run_cli(capsys, "run", "--model", "builtin:tiny", "--policies", str(tmp_path), "--dtype",
                                 dtype, "--prompt", "1, 2,", "--max-new-tokens", "2")
        assert code == 0, err
        assert f"policy: {want}" in err
