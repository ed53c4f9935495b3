"""Masked-diffusion models end to end: `builtin:tiny-mdm`, loading by kind, remote code only on request, the
kind guard of `apply_policy`, and the CLI (`tune`, `run`, `bench`, `report`, refusals)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from policies import apply_policy, model_fingerprint
from policies.diffusion_blocks import DiffusionConfig, DiffusionStats, denoiser_for, diffusion_generate
from policies.model_kind import model_kind
from tuner.cli import main
from tuner.models import ModelSpecError, load_model
from tuner.tasks import get_task


@pytest.fixture(scope="module")
def mdm():
    return load_model("builtin:tiny-mdm")


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def test_tiny_mdm_loads_as_a_shifted_masked_diffusion_model(mdm):
    assert type(mdm.model).__name__ == "EuroBertForMaskedLM" and model_kind(mdm.model) == "masked-diffusion"
    spec = denoiser_for(mdm.model)
    assert spec.shift and spec.mask_id == mdm.tokenizer.mask_token_id == 2048
    assert mdm.tokenizer("x = 1").input_ids == load_model("builtin:tiny").tokenizer("x = 1").input_ids


def test_tiny_mdm_is_good_at_the_builtin_tasks_with_one_token_per_forward(mdm):
    for name, floor in (("needle", 0.8), ("pattern", 0.6)):
        task = get_task(name)
        hits = 0
        for example in task.examples(10, seed=99):
            ids = mdm.tokenizer(example.prompt, return_tensors="pt").input_ids
            with apply_policy(mdm.model, None) as dense:
                out = dense.generate(ids, max_new_tokens=task.max_new_tokens)
            hits += task.score(mdm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), example.answer)
        assert hits / 10 >= floor, name


def test_threshold_one_equals_the_baseline_on_tiny_mdm_with_and_without_cache(mdm):
    ids = mdm.tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    base = diffusion_generate(mdm.model, ids, 12, DiffusionConfig())
    assert torch.equal(base, diffusion_generate(mdm.model, ids, 12, DiffusionConfig(threshold=1.0)))
    stats = DiffusionStats()
    fast = diffusion_generate(mdm.model, ids, 12, DiffusionConfig(threshold=0.9, steps_per_block=None,
                                                                 cache="prefix"), stats=stats)
    assert fast.shape == base.shape and stats.forwards <= 12


def _policy(model, techniques: dict) -> dict:
    from policies.schema import tool_version

    return {"schema_version": 1, "model": {"id": "x", "fingerprint": model_fingerprint(model)},
            "device": {"kind": "cpu", "name": "cpu", "id": "cpu"},
            "workload": {"batch_size": 1, "prompt_tokens": 16, "new_tokens": 8, "dtype": "float32"},
            "objective": {"metric": "latency_ms", "direction": "minimize", "quality_metric": "accuracy",
                          "quality_budget": 1.0}, "techniques": techniques,
            "provenance": {"tool_version": tool_version(), "created_at": "2026-11-21T00:00:00+00:00"}}


def _remote_code_checkpoint(root: Path, mdm) -> Path:
    """A LLaDA-style checkpoint whose config maps the Auto classes to modelling code shipped beside it."""
    from transformers import EuroBertConfig, EuroBertForMaskedLM

    path = root / "llada-toy"
    path.mkdir()
    (path / "configuration_llada.py").write_text(
        "from transformers import EuroBertConfig\n\n\nclass LLaDAConfig(EuroBertConfig):\n    model_type = 'llada'\n")
    (path / "modeling_llada.py").write_text(
        "from transformers import EuroBertForMaskedLM\n\nfrom .configuration_llada import LLaDAConfig\n\n\n"
        "class LLaDAModelLM(EuroBertForMaskedLM):\n    config_class = LLaDAConfig\n")
    config = EuroBertConfig(vocab_size=2049, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, bos_token_id=0,
                            eos_token_id=1, mask_token_id=2048)
    torch.manual_seed(0)
    EuroBertForMaskedLM(config).save_pretrained(path)
    doc = json.loads((path / "config.json").read_text())
    doc.update(model_type="llada", architectures=["LLaDAModelLM"],
               auto_map={"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"})
    (path / "config.json").write_text(json.dumps(doc))
    mdm.tokenizer.save_pretrained(path)
    return path


def test_remote_code_runs_only_with_trust_remote_code(tmp_path, mdm, capsys):
    path = _remote_code_checkpoint(tmp_path, mdm)
    store = tmp_path / "no-policies"
    store.mkdir()
    with pytest.raises(ModelSpecError, match="--trust-remote-code"):
        load_model(str(path))
    assert main(["run", "--model", str(path), "--policies", str(store), "--prompt", "x", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "Traceback" not in err
    loaded = load_model(str(path), trust_remote_code=True)
    assert type(loaded.model).__name__ == "LLaDAModelLM" and model_kind(loaded.model) == "masked-diffusion"
    assert main(["run", "--model", str(path), "--trust-remote-code", "--policies", str(store), "--prompt", "x = ",
                 "--max-new-tokens", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["diffusion"]["forwards"] == 4 and doc["diffusion"]["forwards_per_token"] == 1.0


def test_cli_tune_run_bench_report_on_tiny_mdm(tmp_path, capsys):
    out = tmp_path / "policies"
    code = main(["tune", "--model", "builtin:tiny-mdm", "--techniques", "diffusion_blocks", "--budget", "4",
                 "--prompt-tokens", "64", "--new-tokens", "16", "--repeats", "1", "--examples", "3",
                 "--objective", "tokens_per_s", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    policy_file = Path(summary["policy"])
    doc = yaml.safe_load(policy_file.read_text())
    assert set(doc["techniques"]) == {"diffusion_blocks"}
    assert doc["measured"]["baseline"]["forwards_per_token_ratio"] == 1.0
    trials = (policy_file.with_suffix(".d") / "trials.csv").read_text()
    assert "diffusion_blocks:llada" in trials and "diffusion_blocks:fast-dllm" in trials

    assert main(["run", "--model", "builtin:tiny-mdm", "--policies", str(out), "--prompt", "copy: 1 2 3 |",
                 "--max-new-tokens", "8", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert ran["policy"] and ran["diffusion"]["tokens"] == 8

    assert main(["bench", "--model", "builtin:tiny-mdm", "--policy", str(policy_file), "--repeats", "1",
                 "--examples", "2", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert {"dense", "policy", "preset:llada", "preset:fast-dllm", "preset:adablock"} <= set(rows)
    assert rows["dense"]["forwards_per_token"] == rows["preset:llada"]["forwards_per_token"] == 1.0
    assert rows["preset:fast-dllm"]["forwards_per_token"] <= 1.0

    assert main(["report", str(policy_file)]) == 0
    capsys.readouterr()


def test_cli_refuses_diffusion_techniques_on_a_causal_lm_and_the_reverse(tmp_path, capsys):
    for model, technique in (("builtin:tiny", "diffusion_blocks"), ("builtin:tiny-mdm", "token_retention")):
        code = main(["tune", "--model", model, "--techniques", technique, "--budget", "1",
                     "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and f"--techniques {technique}: applies to" in err and "Traceback" not in err
    assert not any(tmp_path.rglob("*.yaml"))
    shutil.rmtree(tmp_path, ignore_errors=True)
