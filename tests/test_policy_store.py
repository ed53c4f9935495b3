"""Policy files and the per-device store: load errors name the file, saves are atomic, selection is
by exact device id, then device name, then kind (warned), else dense (warned) or an error when strict."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

import policies.io as policy_io
from policies import (
    PolicyError,
    PolicyWarning,
    load_policy,
    load_policy_file,
    model_fingerprint,
    model_slug,
    policy_from_dict,
    policy_path,
    save_policy,
)
from policies.testing import fake_device, make_policy_dict, tiny_llama

H100_A = fake_device("nvidia-h100-80gb-hbm3", "cuda", "NVIDIA H100 80GB HBM3")
H100_B = fake_device("nvidia-h100-80gb-hbm3-mig", "cuda", "NVIDIA H100 80GB HBM3")
A100 = fake_device("nvidia-a100-sxm4-40gb", "cuda", "NVIDIA A100-SXM4-40GB")
L4 = fake_device("nvidia-l4", "cuda", "NVIDIA L4")
XEON = fake_device("cpu-intel-xeon-2t", "cpu", "Intel Xeon")


def _tiny(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(seed, layers)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _tiny()


def _write(root: Path, model: Any, device: dict[str, Any], *, created_at: str = "2025-01-01T00:00:00+00:00",
           name: str | None = None, model_id: str = "builtin:tiny") -> Path:
    d = make_policy_dict(model_fingerprint(model), model_id=model_id, device=device, created_at=created_at)
    path = policy_path(root, model_id, device["id"]) if name is None else root / name
    save_policy(policy_from_dict(d), path)
    return path


# ------------------------------------------------------------------------------------------- file io


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.yaml", "", "empty.yaml: empty file"),
        ("comments.yaml", "# nothing here\n\n", "comments.yaml: empty file"),
        ("x.yaml", "just a string\n", "x.yaml: top level must be a mapping, got str"),
        ("list.yaml", "- 1\n- 2\n", "list.yaml: top level must be a mapping, got list"),
        ("bad.yaml", "a: 1\nb:\n  c: [1, 2\n  d: 3\n", "bad.yaml: not valid YAML (line "),
        ("tabs.yaml", "a:\n\tb: 1\n", "tabs.yaml: not valid YAML (line 2, column 1: "),
        ("binary.yaml", b"\xff\xfe\x00", "binary.yaml: not UTF-8 text"),
        ("invalid.yaml", "schema_version: 1\n", "invalid.yaml: 6 problems: model: missing;"),
    ],
)
def test_load_errors_are_one_line_and_name_the_file(tmp_path: Path, name: str, content: Any, expected: str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PolicyError) as err:
        load_policy_file(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / expected)), message


def test_missing_path_and_directory_are_errors(tmp_path: Path):
    with pytest.raises(PolicyError, match=r"nope\.yaml: no such file$"):
        load_policy_file(tmp_path / "nope.yaml")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy_file(tmp_path)


def test_save_creates_parents_and_round_trips(tmp_path: Path, model: LlamaForCausalLM):
    path = _write(tmp_path / "deep" / "store", model, XEON)
    assert path == tmp_path / "deep" / "store" / "builtin-tiny" / "cpu-intel-xeon-2t.yaml"
    assert load_policy_file(path).source == str(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_save_refuses_an_invalid_policy(tmp_path: Path):
    policy = policy_from_dict(make_policy_dict())
    policy.workload.batch_size = 0
    with pytest.raises(PolicyError, match="workload.batch_size"):
        save_policy(policy, tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()


def test_failed_save_leaves_old_file_intact_and_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "p.yaml"
    save_policy(policy_from_dict(make_policy_dict()), path)
    before = path.read_bytes()

    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:  # the new content is half written when the "disk" fails
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(policy_io.os, "fsync", failing_fsync)
    changed = policy_from_dict(make_policy_dict(created_at="2026-01-01T00:00:00+00:00"))
    with pytest.raises(OSError, match="Input/output error"):
        save_policy(changed, path)
    monkeypatch.setattr(policy_io.os, "fsync", real_fsync)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "p.yaml"
    save_policy(policy_from_dict(make_policy_dict()), path)
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # even an interrupt must not leave a temp file behind

    monkeypatch.setattr(policy_io.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_policy(policy_from_dict(make_policy_dict(created_at="2026-01-01T00:00:00+00:00")), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


# ---------------------------------------------------------------------------------------------- slugs


@pytest.mark.parametrize(
    ("model_id", "slug"),
    [
        ("builtin:tiny", "builtin-tiny"),
        ("meta-llama/Llama-3-8B", "meta-llama--llama-3-8b"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen--qwen2.5-0.5b-instruct"),
        ("/home/me/ckpt/", "home--me--ckpt"),
        ("../../etc/passwd", "etc--passwd"),
        ("./my model@v2", "my-model-v2"),
        ("C:\\models\\x", "c--models--x"),
    ],
)
def test_model_slug(model_id: str, slug: str):
    assert model_slug(model_id) == slug
    assert os.sep not in slug and not slug.startswith(".")


def test_model_slug_rejects_empty():
    with pytest.raises(ValueError):
        model_slug("///")


def test_policy_path_layout(tmp_path: Path):
    assert policy_path(tmp_path, "meta-llama/Llama-3-8B", "nvidia-h100-80gb-hbm3") == (
        tmp_path / "meta-llama--llama-3-8b" / "nvidia-h100-80gb-hbm3.yaml"
    )
    assert policy_path(tmp_path, "builtin:tiny", "cpu-x", "bfloat16") == tmp_path / "builtin-tiny" / (
        "cpu-x.bfloat16.yaml")


# ------------------------------------------------------------------------------------------ selection


@pytest.fixture
def store(tmp_path: Path, model: LlamaForCausalLM) -> Path:
    root = tmp_path / "policies"
    for device in (H100_A, A100, XEON):
        _write(root, model, device)
    return root


def test_select_exact_device_id_without_warning(store: Path, model: LlamaForCausalLM):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = load_policy(store, model, device=H100_A)
    assert policy is not None and policy.device["id"] == H100_A["id"]
    assert policy.source == str(store / "builtin-tiny" / "nvidia-h100-80gb-hbm3.yaml")


def test_select_same_name_without_warning(store: Path, model: LlamaForCausalLM):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = load_policy(store, model, device=H100_B)
    assert policy is not None and policy.device["id"] == H100_A["id"]


def test_select_same_kind_warns_naming_the_file(store: Path, model: LlamaForCausalLM):
    with pytest.warns(PolicyWarning, match=r"nvidia-a100-sxm4-40gb\.yaml|nvidia-h100-80gb-hbm3\.yaml") as rec:
        policy = load_policy(store, model, device=L4)
    assert policy is not None and policy.device["kind"] == "cuda"
    assert "nvidia-l4" in str(rec[0].message) and "same kind" in str(rec[0].message)


def test_select_none_warns_and_returns_none(tmp_path: Path, model: LlamaForCausalLM):
    root = tmp_path / "p"
    _write(root, model, XEON)
    with pytest.warns(PolicyWarning, match="no policy for device nvidia-l4.*running the dense model"):
        assert load_policy(root, model, device=L4) is None
    with pytest.raises(PolicyError, match="no policy for device nvidia-l4"):
        load_policy(root, model, device=L4, strict=True)


def test_empty_dir_warns_or_raises(tmp_path: Path, model: LlamaForCausalLM):
    with pytest.warns(PolicyWarning, match="no policy files"):
        assert load_policy(tmp_path, model, device=XEON) is None
    with pytest.raises(PolicyError, match="no policy files"):
        load_policy(tmp_path, model, device=XEON, strict=True)


def test_missing_path_is_an_error_even_when_not_strict(tmp_path: Path, model: LlamaForCausalLM):
    with pytest.raises(PolicyError, match="no such file or directory"):
        load_policy(tmp_path / "typo", model, device=XEON)


def test_ties_break_by_newest_created_at_then_path(tmp_path: Path, model: LlamaForCausalLM):
    root = tmp_path / "p"
    _write(root, model, XEON, name="b.yaml", created_at="2025-01-01T00:00:00Z")
    _write(root, model, XEON, name="c.yaml", created_at="2025-06-01T00:00:00+02:00")
    _write(root, model, XEON, name="a.yaml", created_at="2025-06-01T00:00:00+02:00")
    _write(root, model, XEON, name="d.yaml", created_at="2025-05-31T23:30:00+00:00")  # newest (UTC)
    policy = load_policy(root, model, device=XEON)
    assert policy is not None and Path(policy.source or "").name == "d.yaml"
    (root / "d.yaml").unlink()
    policy = load_policy(root, model, device=XEON)
    assert policy is not None and Path(policy.source or "").name == "a.yaml"


def test_exact_id_beats_newer_same_kind(tmp_path: Path, model: LlamaForCausalLM):
    root = tmp_path / "p"
    _write(root, model, A100, created_at="2026-01-01T00:00:00+00:00")
    _write(root, model, H100_A, created_at="2020-01-01T00:00:00+00:00")
    policy = load_policy(root, model, device=H100_A)
    assert policy is not None and policy.device["id"] == H100_A["id"]


def test_invalid_files_are_skipped_with_a_warning(store: Path, model: LlamaForCausalLM):
    (store / "builtin-tiny" / "broken.yaml").write_text("a: [1,\n")
    (store / "builtin-tiny" / "wrong.yaml").write_text("schema_version: 1\n")
    with pytest.warns(PolicyWarning) as rec:
        policy = load_policy(store, model, device=H100_A)
    assert policy is not None and policy.device["id"] == H100_A["id"]
    messages = " | ".join(str(r.message) for r in rec)
    assert "broken.yaml: not valid YAML" in messages and "wrong.yaml:" in messages


def test_policies_for_other_models_are_ignored(tmp_path: Path, model: LlamaForCausalLM):
    root = tmp_path / "p"
    other = _tiny(layers=3)
    _write(root, other, H100_A)  # same model id and device, other model
    _write(root, model, XEON)
    with pytest.warns(PolicyWarning, match="no policy for device"):
        assert load_policy(root, model, device=H100_A) is None
    policy = load_policy(root, model, device=XEON)
    assert policy is not None and policy.device["id"] == XEON["id"]


def test_no_policy_for_this_model_warns_or_raises_naming_fields(tmp_path: Path, model: LlamaForCausalLM):
    root = tmp_path / "p"
    _write(root, _tiny(layers=3), XEON)
    with pytest.warns(PolicyWarning, match="no valid policy for this model"):
        assert load_policy(root, model, device=XEON) is None
    with pytest.raises(PolicyError, match="num_layers 3 != 2"):
        load_policy(root, model, device=XEON, strict=True)


def test_file_for_another_model_is_refused_naming_the_field(tmp_path: Path, model: LlamaForCausalLM):
    path = _write(tmp_path, _tiny(layers=3), XEON)
    with pytest.raises(PolicyError) as err:
        load_policy(path, model, device=XEON)
    assert str(err.value).startswith(f"{path}: policy is for another model: num_layers 3 != 2")


def test_file_for_same_architecture_other_weights_is_refused(tmp_path: Path, model: LlamaForCausalLM):
    path = _write(tmp_path, _tiny(seed=1), XEON)
    with pytest.raises(PolicyError, match="policy is for another model: weights_digest "):
        load_policy(path, model, device=XEON)


def test_file_for_another_device_is_used_with_a_warning(tmp_path: Path, model: LlamaForCausalLM):
    path = _write(tmp_path, model, A100)
    with pytest.warns(PolicyWarning, match="tuned on nvidia-a100-sxm4-40gb"):
        policy = load_policy(path, model, device=XEON)
    assert policy is not None and policy.device == A100


def test_device_argument_forms(tmp_path: Path, model: LlamaForCausalLM):
    device_mod = pytest.importorskip("profilers.device")
    here = device_mod.resolve_device("cpu")
    root = tmp_path / "p"
    _write(root, model, here.to_dict())
    for spec in (here, here.to_dict(), "cpu", here.id, None if not torch.cuda.is_available() else "cpu"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            policy = load_policy(root, model, device=spec)
        assert policy is not None and policy.device["id"] == here.id
    with pytest.raises(PolicyError, match="device: unknown device 'tpu'"):
        load_policy(root, model, device="tpu")
