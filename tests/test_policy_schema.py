"""Policy schema: exact round trips, validation problems that name their field path, JSON Schema sync."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from policies import (
    SCHEMA_VERSION,
    FunctionHandle,
    Policy,
    PolicyError,
    TechniqueRuntime,
    load_policy_file,
    policy_from_dict,
    policy_json_schema,
    policy_to_dict,
    register_runtime,
    save_policy,
    validate_policy_dict,
)
from policies.registry import unregister_runtime
from policies.schema import render_policy_json_schema
from policies.testing import make_policy_dict

REPO = Path(__file__).resolve().parents[1]


class KeepRuntime(TechniqueRuntime):
    """Test-only technique with a per-layer list, to exercise section validation paths."""

    name = "test_keep"

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        problems = [f"{path}.{k}: unknown field" for k in section if k != "keep"]
        keep = section.get("keep")
        if not isinstance(keep, list):
            return [*problems, f"{path}.keep: must be a list"]
        for i, v in enumerate(keep):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                problems.append(f"{path}.keep[{i}]: must be in (0, 1]")
        return problems

    def apply(self, model: Any, section: dict[str, Any]) -> FunctionHandle:
        return FunctionHandle(lambda: None)


class LoopRuntime(TechniqueRuntime):
    """Test-only decode-loop owners: two of them in one policy must be refused."""

    owns_generate = True

    def __init__(self, name: str) -> None:
        self.name = name

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        return []

    def apply(self, model: Any, section: dict[str, Any]) -> FunctionHandle:
        return FunctionHandle(lambda: None)


class CrashingRuntime(KeepRuntime):
    name = "test_crashing"

    def validate(self, section: dict[str, Any], path: str) -> list[str]:
        raise RuntimeError("boom")


@pytest.fixture(autouse=True, scope="module")
def _test_runtimes():
    runtimes = [KeepRuntime(), LoopRuntime("test_loop_a"), LoopRuntime("test_loop_b"), CrashingRuntime()]
    for rt in runtimes:
        register_runtime(rt, replace=True)
    yield
    for rt in runtimes:
        unregister_runtime(rt.name)


def _ordered(obj: Any) -> str:
    """Key order matters for the file, so compare through an order-preserving serialisation."""
    return json.dumps(obj, sort_keys=False)


def test_dict_round_trip_is_exact_including_key_order():
    d = make_policy_dict(techniques={"test_keep": {"keep": [1.0, 0.5, 0.25]}})
    d["device"]["flags"] = ["avx2", "avx512f"]
    d["provenance"]["git_commit"] = "abc123"
    policy = policy_from_dict(d)
    assert isinstance(policy, Policy)
    assert _ordered(policy_to_dict(policy)) == _ordered(d)
    # the Policy does not alias the input
    d["techniques"]["test_keep"]["keep"][0] = 0.1
    assert policy.techniques["test_keep"]["keep"][0] == 1.0


def test_optional_fields_are_omitted_not_nulled():
    d = make_policy_dict(measured=False)
    del d["workload"]["task"], d["objective"]["budget_met"]
    for key in ("study", "storage", "trial", "seed"):
        del d["provenance"][key]
    assert _ordered(policy_to_dict(policy_from_dict(d))) == _ordered(d)


def test_file_round_trip_is_byte_identical(tmp_path: Path):
    d = make_policy_dict(techniques={"test_keep": {"keep": [1.0, 0.5, 0.25, 1e-05]}})
    d["objective"]["budget_met"] = False
    d["device"]["flags"] = ["avx2"]
    first = tmp_path / "a.yaml"
    save_policy(policy_from_dict(d), first)
    second = tmp_path / "b.yaml"
    save_policy(load_policy_file(first), second)
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert text.startswith(f"# autotune policy, schema_version {SCHEMA_VERSION}")
    assert "keep: [1.0, 0.5, 0.25, 1.0e-05]" in text  # per-layer lists stay on one line
    assert yaml.safe_load(text) == d


def _mutate(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        d = d[key]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()

CASES = [
    ("schema_version", _DELETE, "schema_version: missing"),
    ("schema_version", "1", "schema_version: must be an integer"),
    ("model", _DELETE, "model: missing"),
    ("model.id", "", "model.id: must be a non-empty string"),
    ("model.fingerprint.num_layers", _DELETE, "model.fingerprint.num_layers: missing"),
    ("model.fingerprint.num_layers", -2, "model.fingerprint.num_layers: must be a positive integer"),
    ("model.fingerprint.extra", 1, "model.fingerprint.extra: unknown field"),
    ("device.kind", "tpu", "device.kind: must be one of cpu, cuda"),
    ("device.id", _DELETE, "device.id: missing"),
    ("device.index", -1, "device.index: must be a non-negative integer or null"),
    ("device.flags", ("avx2",), "device.flags: must be plain data"),
    ("device", ["cpu"], "device: must be a mapping, got list"),
    ("workload.batch_size", 0, "workload.batch_size: must be a positive integer"),
    ("workload.batch_size", True, "workload.batch_size: must be a positive integer"),
    ("workload.prompt_tokens", 12.5, "workload.prompt_tokens: must be a positive integer"),
    ("workload.new_tokens", _DELETE, "workload.new_tokens: missing"),
    ("workload.dtype", "fp32", "workload.dtype: must be one of"),
    ("workload.batchsize", 4, "workload.batchsize: unknown field"),
    ("objective.quality_budget", -0.5, "objective.quality_budget: must be a number >= 0"),
    ("objective.quality_budget", "1", "objective.quality_budget: must be a number >= 0"),
    ("objective.quality_budget", float("nan"), "objective.quality_budget: must be a number >= 0"),
    ("objective.direction", "down", "objective.direction: must be one of minimize, maximize"),
    ("objective.direction", "maximize", "objective.direction: ttft_ms is a time; it must be minimized"),
    ("objective.metric", "speed", "objective.metric: 'speed' has no unit suffix"),
    ("objective.budget_met", "yes", "objective.budget_met: must be true, false or null"),
    ("techniques", [], "techniques: must be a mapping, got list"),
    ("techniques.bogus", {}, "techniques.bogus: unknown technique 'bogus' (known: "),
    ("techniques.test_keep", None, "techniques.test_keep: must be a mapping, got null"),
    ("techniques.test_keep", {"keep": [1.0, 0.5, 0.9, 1.5]}, "techniques.test_keep.keep[3]: must be in (0, 1]"),
    ("techniques.test_keep", {"keep": [1.0], "x": 1}, "techniques.test_keep.x: unknown field"),
    ("techniques.test_crashing", {}, "techniques.test_crashing: validator failed: RuntimeError: boom"),
    ("measured.tuned", _DELETE, "measured.tuned: missing"),
    ("measured.tuned.speed", 3.0, "measured.tuned.speed: has no unit suffix"),
    ("measured.baseline.ttft_ms", "fast", "measured.baseline.ttft_ms: must be a finite number or null"),
    ("measured.baseline.ttft_ms", float("inf"), "measured.baseline.ttft_ms: must be a finite number or null"),
    ("provenance.created_at", "yesterday", "provenance.created_at: must be an ISO 8601 timestamp"),
    ("provenance.tool_version", _DELETE, "provenance.tool_version: missing"),
    ("provenance.trial", "17", "provenance.trial: must be an integer or null"),
    ("provenance.extra", {1: "x"}, "provenance.extra: keys must be strings"),
    ("surprise", 1, "surprise: unknown field (known: schema_version, model,"),
]


@pytest.mark.parametrize(("path", "value", "expected"), CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_every_problem_names_its_path(path: str, value: Any, expected: str):
    d = make_policy_dict(techniques={"test_keep": {"keep": [1.0, 0.5]}})
    _mutate(d, path, value)
    problems = validate_policy_dict(d)
    assert any(p.startswith(expected) for p in problems), problems
    with pytest.raises(PolicyError) as err:
        policy_from_dict(d)
    assert err.value.problems == problems
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


def test_unknown_technique_lists_known_ones():
    d = make_policy_dict(techniques={"bogus": {}})
    (problem,) = validate_policy_dict(d)
    assert "test_keep" in problem and "bogus" in problem


def test_all_problems_are_reported_not_just_the_first():
    d = make_policy_dict()
    d["workload"]["batch_size"] = -1
    d["objective"]["quality_budget"] = -1
    d["device"]["kind"] = "tpu"
    del d["provenance"]
    problems = validate_policy_dict(d)
    assert len(problems) == 4
    message = str(PolicyError(problems, "x.yaml"))
    assert message.startswith("x.yaml: 4 problems: ")


def test_newer_schema_version_is_a_clear_error():
    d = make_policy_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    d["something_new"] = {"a": 1}
    assert validate_policy_dict(d) == [
        f"schema_version: {SCHEMA_VERSION + 1} is newer than this autotune supports ({SCHEMA_VERSION});"
        " upgrade autotune to read this policy"
    ]


def test_at_most_one_technique_owns_generate():
    d = make_policy_dict(techniques={"test_loop_a": {}, "test_loop_b": {}})
    problems = validate_policy_dict(d)
    assert problems == [
        "techniques: at most one technique may own the decode loop (generate), got test_loop_a, test_loop_b"
    ]
    assert validate_policy_dict(make_policy_dict(techniques={"test_loop_a": {}, "test_keep": {"keep": [1]}})) == []


def test_top_level_must_be_mapping():
    assert validate_policy_dict(["a"]) == ["top level must be a mapping, got list"]


def test_unquoted_yaml_timestamp_is_accepted_and_normalised():
    d = make_policy_dict()
    d["provenance"]["created_at"] = yaml.safe_load("t: 2025-03-01T10:00:00Z")["t"]
    policy = policy_from_dict(d)
    assert policy.provenance.created_at.startswith("2025-03-01T10:00:00")


def test_policy_object_is_independent_copy():
    d = make_policy_dict()
    policy = policy_from_dict(d)
    again = policy_from_dict(copy.deepcopy(d))
    assert policy == again


def test_json_schema_file_is_in_sync():
    committed = (REPO / "policies" / "policy.schema.json").read_text(encoding="utf-8")
    assert committed == render_policy_json_schema(), "run `python -m policies.schema` and commit the file"
    assert policy_json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_json_schema_check_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "policies.schema", "--check"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RuntimeWarning" not in out.stderr


def test_json_schema_accepts_valid_and_rejects_invalid():
    jsonschema = pytest.importorskip("jsonschema")
    schema = policy_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = make_policy_dict(techniques={"test_keep": {"keep": [1.0]}})
    assert list(validator.iter_errors(good)) == []
    bad = make_policy_dict()
    bad["workload"]["batch_size"] = 0
    bad["measured"]["tuned"]["speed"] = 1.0
    assert len(list(validator.iter_errors(bad))) >= 2
