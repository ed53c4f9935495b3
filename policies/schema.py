"""The policy schema: one versioned structure, validated with field paths, round-tripped exactly.

A policy is what the tuner writes and the runtime applies. Layout (``SCHEMA_VERSION = 1``), in the key order
``policy_to_dict`` writes::

    schema_version: 1
    model:       {id, fingerprint: {architecture, num_layers, hidden_size, num_attention_heads,
                                    num_key_value_heads, intermediate_size, vocab_size, dtype, weights_digest}}
    device:      flat device fingerprint (profilers.device.DeviceFingerprint.to_dict()): id, kind, name, ...
    workload:    {batch_size, prompt_tokens, new_tokens, dtype, task?}
    objective:   {metric, direction, quality_metric, quality_budget, budget_met?}
    techniques:  {name: section, ...}          # {} = dense; each section validated by its runtime
    measured?:   {baseline: METRICS, tuned: METRICS, <other label>: METRICS ...}
    provenance:  {tool_version, study?, storage?, trial?, seed?, created_at, <extra keys>...}

Units convention for ``measured`` (and ``objective.metric``): **the unit is a suffix of the key name**, the
value a plain number (or null when not measured), e.g. ``ttft_ms``, ``latency_ms``, ``tpot_ms``,
``tokens_per_s``, ``peak_memory_mb``. Recognised suffixes are ``UNIT_SUFFIXES``; dimensionless values use
``_ratio``/``_rate``/``_x``/``_pct``/``_count``. Two keys are exempt: ``quality`` (a score in the points of
``quality_metric``, the same scale as ``objective.quality_budget``) and ``quality_metric`` (its name).
We chose suffixes over ``{value, unit}`` mappings because the files stay one line per number, diff cleanly,
and the key a script reads already says the unit, so nobody can read milliseconds as seconds.

Canonical form: ``policy_to_dict(policy_from_dict(d)) == d`` (same keys, same order) for every dict that is
already canonical, which is what ``save_policy`` writes: fixed sections in the order above, optional fields
(``?``) omitted when null, free-form mappings (device, technique sections, measured, provenance extras)
kept in their own order. A file written by the tool therefore round-trips byte for byte.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.registry import builtin_runtime_names, get_runtime, registered_runtimes, runtime_owns_generate

__all__ = [
    "DEVICE_KINDS",
    "DIRECTIONS",
    "FINGERPRINT_FIELDS",
    "SCHEMA_VERSION",
    "TOOL_NAME",
    "UNIT_SUFFIXES",
    "WORKLOAD_DTYPES",
    "ModelSpec",
    "Objective",
    "Policy",
    "PolicyError",
    "PolicyWarning",
    "Provenance",
    "Workload",
    "policy_from_dict",
    "policy_json_schema",
    "policy_to_dict",
    "render_policy_json_schema",
    "tool_version",
    "validate_policy_dict",
    "validate_techniques",
]

SCHEMA_VERSION = 1
TOOL_NAME = "autotune"

FINGERPRINT_FIELDS: tuple[str, ...] = (
    "architecture",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "dtype",
    "weights_digest",
)
_FINGERPRINT_INT_FIELDS = frozenset(FINGERPRINT_FIELDS) - {"architecture", "dtype", "weights_digest"}

DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda")
DIRECTIONS: tuple[str, ...] = ("minimize", "maximize")
WORKLOAD_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2")

#: Unit suffixes of measured metric keys. ``_per_s`` is listed before ``_s`` on purpose (longest first).
UNIT_SUFFIXES: tuple[str, ...] = (
    "_per_s",
    "_ms",
    "_us",
    "_s",
    "_mb",
    "_gb",
    "_bytes",
    "_pct",
    "_ratio",
    "_rate",
    "_x",
    "_tokens",
    "_count",
    "_w",
    "_j",
)
_UNITLESS_METRICS = ("quality",)
_TIME_SUFFIXES = ("_ms", "_us", "_s")

_TOP_KEYS = ("schema_version", "model", "device", "workload", "objective", "techniques", "measured", "provenance")
_TOP_REQUIRED = ("schema_version", "model", "device", "workload", "objective", "techniques", "provenance")
_MODEL_KEYS = ("id", "fingerprint")
_WORKLOAD_KEYS = ("batch_size", "prompt_tokens", "new_tokens", "dtype", "task")
_OBJECTIVE_KEYS = ("metric", "direction", "quality_metric", "quality_budget", "budget_met")
_PROVENANCE_KNOWN = ("tool_version", "study", "storage", "trial", "seed", "created_at")


def tool_version() -> str:
    """Version of the installed autotune distribution (``0+unknown`` when running from a bare checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(TOOL_NAME)
    except PackageNotFoundError:
        return "0+unknown"


class PolicyError(ValueError):
    """A policy that cannot be used. ``problems`` lists every problem, each starting with its field path.

    ``str(error)`` is one line (CLI prints it as is): ``[source: ]problem`` or
    ``[source: ]N problems: p1; p2; ...``.
    """

    def __init__(self, problems: str | list[str], source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = [" ".join(str(p).split()) for p in problems]
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        if len(self.problems) == 1:
            body = self.problems[0]
        else:
            body = f"{len(self.problems)} problems: " + "; ".join(self.problems)
        return f"{self.source}: {body}" if self.source else body


class PolicyWarning(UserWarning):
    """Selection fell back (another device of the same kind, dense) or skipped an invalid file."""


def _put_optional(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


# --------------------------------------------------------------------------------------------------- data


@dataclass
class ModelSpec:
    """Which model a policy is for: the user-facing id plus the fingerprint that is actually checked."""

    id: str
    fingerprint: dict[str, Any]


@dataclass
class Workload:
    """The workload the policy was tuned for (technique choices depend on prompt length and batch)."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    dtype: str
    task: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The canonical ``workload`` section (``task`` omitted when None)."""
        out: dict[str, Any] = {
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "dtype": self.dtype,
        }
        _put_optional(out, "task", self.task)
        return out


@dataclass
class Objective:
    """What was optimised and under which quality constraint.

    ``quality_budget`` is the largest allowed quality drop versus the dense model, in the points of
    ``quality_metric``. ``budget_met=False`` marks a best-effort policy (no trial met the budget).
    """

    metric: str
    direction: str
    quality_metric: str | None
    quality_budget: float
    budget_met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """The canonical ``objective`` section (``budget_met`` omitted when None)."""
        out: dict[str, Any] = {
            "metric": self.metric,
            "direction": self.direction,
            "quality_metric": self.quality_metric,
            "quality_budget": self.quality_budget,
        }
        _put_optional(out, "budget_met", self.budget_met)
        return out


@dataclass
class Provenance:
    """Who/what produced the policy, enough to find the study and trial again. ``extra``: other keys."""

    tool_version: str
    created_at: str
    study: str | None = None
    storage: str | None = None
    trial: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def now(cls, **kwargs: Any) -> Provenance:
        """Provenance stamped with this tool's version and the current UTC time."""
        kwargs.setdefault("tool_version", tool_version())
        kwargs.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return cls(**kwargs)


@dataclass
class Policy:
    """One tuned policy for one (model, device, workload). See the module docstring for the layout."""

    model: ModelSpec
    device: dict[str, Any]
    workload: Workload
    objective: Objective
    techniques: dict[str, dict[str, Any]] = field(default_factory=dict)
    measured: dict[str, dict[str, Any]] | None = None
    provenance: Provenance = field(default_factory=Provenance.now)
    schema_version: int = SCHEMA_VERSION
    #: The file it was loaded from (not part of the policy: ignored by ``==`` and ``policy_to_dict``).
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def is_dense(self) -> bool:
        """True when the policy applies no technique."""
        return not self.techniques


# ------------------------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def is_int(value: Any) -> bool:
    """An integer from YAML (bools are ints in Python, but never a valid integer field)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number from YAML (bools are ints in Python, but never a valid number field)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_mapping(value: Any, path: str, problems: list[str]) -> bool:
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        for k in bad:
            problems.append(f"{path}: keys must be strings, got {k!r}")
        return not bad
    problems.append(f"{path}: must be a mapping, got {_type_name(value)}")
    return False


def _check_keys(
    mapping: dict[str, Any], path: str, known: tuple[str, ...], required: tuple[str, ...], problems: list[str]
) -> None:
    for key in required:
        if key not in mapping:
            problems.append(f"{_join(path, key)}: missing")
    for key in mapping:
        if key not in known:
            problems.append(f"{_join(path, key)}: unknown field (known: {', '.join(known)})")


def _check_plain(value: Any, path: str, problems: list[str]) -> None:
    """Free-form parts must be data YAML and JSON both carry: str, finite-or-not numbers, bool, null,
    lists and string-keyed mappings (no tuples, tensors or numpy scalars that would not load back)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]", problems)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: keys must be strings, got {key!r}")
                continue
            _check_plain(item, _join(path, key), problems)
        return
    problems.append(f"{path}: must be plain data (str, number, bool, null, list, mapping), got {_type_name(value)}")


def _check_str(value: Any, path: str, problems: list[str], *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string or null" if nullable else "a non-empty string"
        problems.append(f"{path}: must be {kind}, got {_type_name(value)}")


def _check_pos_int(value: Any, path: str, problems: list[str]) -> None:
    if not is_int(value) or value <= 0:
        problems.append(f"{path}: must be a positive integer, got {value!r}")


def _parse_timestamp(value: Any) -> _dt.datetime | None:
    """ISO 8601 timestamp -> aware datetime (naive = UTC); None when unparseable."""
    if isinstance(value, _dt.datetime):
        ts = value
    elif isinstance(value, _dt.date):
        ts = _dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not take "Z"
            text = text[:-1] + "+00:00"
        try:
            ts = _dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=_dt.timezone.utc)


def _metric_unit_problem(key: str) -> str | None:
    if key in _UNITLESS_METRICS or key.endswith(UNIT_SUFFIXES):
        return None
    return f"has no unit suffix (name it like ttft_ms, latency_ms, tokens_per_s; suffixes: {', '.join(UNIT_SUFFIXES)})"


def _validate_fingerprint(fp: Any, path: str, problems: list[str]) -> None:
    if not _check_mapping(fp, path, problems):
        return
    _check_keys(fp, path, FINGERPRINT_FIELDS, FINGERPRINT_FIELDS, problems)
    for key in FINGERPRINT_FIELDS:
        if key not in fp:
            continue
        value, p = fp[key], _join(path, key)
        if key in _FINGERPRINT_INT_FIELDS:
            _check_pos_int(value, p, problems)
        else:
            _check_str(value, p, problems)


def _validate_model(model: Any, problems: list[str]) -> None:
    if not _check_mapping(model, "model", problems):
        return
    _check_keys(model, "model", _MODEL_KEYS, _MODEL_KEYS, problems)
    if "id" in model:
        _check_str(model["id"], "model.id", problems)
    if "fingerprint" in model:
        _validate_fingerprint(model["fingerprint"], "model.fingerprint", problems)


def _validate_device(device: Any, problems: list[str]) -> None:
    if not _check_mapping(device, "device", problems):
        return
    for key in ("id", "kind", "name"):
        if key not in device:
            problems.append(f"device.{key}: missing")
    if "id" in device:
        _check_str(device["id"], "device.id", problems)
    if "kind" in device and device["kind"] not in DEVICE_KINDS:
        problems.append(f"device.kind: must be one of {', '.join(DEVICE_KINDS)}, got {device['kind']!r}")
    if "name" in device:
        _check_str(device["name"], "device.name", problems)
    if "index" in device and device["index"] is not None and (not is_int(device["index"]) or device["index"] < 0):
        problems.append(f"device.index: must be a non-negative integer or null, got {device['index']!r}")
    for key, value in device.items():
        if key not in ("id", "kind", "name", "index"):
            _check_plain(value, f"device.{key}", problems)


def _validate_workload(workload: Any, problems: list[str]) -> None:
    if not _check_mapping(workload, "workload", problems):
        return
    _check_keys(workload, "workload", _WORKLOAD_KEYS, _WORKLOAD_KEYS[:4], problems)
    for key in ("batch_size", "prompt_tokens", "new_tokens"):
        if key in workload:
            _check_pos_int(workload[key], f"workload.{key}", problems)
    if "dtype" in workload and workload["dtype"] not in WORKLOAD_DTYPES:
        problems.append(f"workload.dtype: must be one of {', '.join(WORKLOAD_DTYPES)}, got {workload['dtype']!r}")
    if "task" in workload:
        _check_str(workload["task"], "workload.task", problems, nullable=True)


def _validate_objective(objective: Any, problems: list[str]) -> None:
    if not _check_mapping(objective, "objective", problems):
        return
    _check_keys(objective, "objective", _OBJECTIVE_KEYS, _OBJECTIVE_KEYS[:4], problems)
    metric, direction = objective.get("metric"), objective.get("direction")
    if "metric" in objective:
        _check_str(metric, "objective.metric", problems)
        if isinstance(metric, str) and metric.strip() and (why := _metric_unit_problem(metric)):
            problems.append(f"objective.metric: {metric!r} {why}")
    if "direction" in objective and direction not in DIRECTIONS:
        problems.append(f"objective.direction: must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    elif isinstance(metric, str) and direction in DIRECTIONS:
        # Catch the silent disaster of a tuner maximising latency or minimising throughput.
        if metric.endswith("_per_s") and direction != "maximize":
            problems.append(f"objective.direction: {metric} is a rate; it must be maximized, not {direction}d")
        elif not metric.endswith("_per_s") and metric.endswith(_TIME_SUFFIXES) and direction != "minimize":
            problems.append(f"objective.direction: {metric} is a time; it must be minimized, not {direction}d")
    if "quality_metric" in objective:
        _check_str(objective["quality_metric"], "objective.quality_metric", problems, nullable=True)
    if "quality_budget" in objective:
        budget = objective["quality_budget"]
        if not _is_finite_number(budget) or budget < 0:
            problems.append(f"objective.quality_budget: must be a number >= 0, got {budget!r}")
    if "budget_met" in objective and objective["budget_met"] is not None:
        if not isinstance(objective["budget_met"], bool):
            problems.append(f"objective.budget_met: must be true, false or null, got {objective['budget_met']!r}")


def validate_techniques(techniques: Any, path: str = "techniques") -> list[str]:
    """Problems of a ``techniques`` mapping: unknown names, non-mapping sections, each runtime's own
    validation, and more than one decode-loop owner (two techniques cannot both own ``generate``)."""
    problems: list[str] = []
    if not _check_mapping(techniques, path, problems):
        return problems
    owners: list[str] = []
    for name, section in techniques.items():
        p = _join(path, name)
        try:
            runtime = get_runtime(name)
        except KeyError:
            known = ", ".join(registered_runtimes()) or "none registered"
            problems.append(f"{p}: unknown technique {name!r} (known: {known})")
            continue
        if not _check_mapping(section, p, problems):
            continue
        before = len(problems)
        _check_plain(section, p, problems)
        if len(problems) > before:
            continue
        try:
            found = list(runtime.validate(section, p))
        except Exception as exc:  # a buggy validator must not crash policy selection
            found = [f"{p}: validator failed: {type(exc).__name__}: {exc}"]
        # Every problem names its path, even when a plug-in forgets to prefix it.
        problems.extend(str(f) if str(f).startswith(p) else f"{p}: {f}" for f in found)
        if runtime_owns_generate(runtime):
            owners.append(name)
    if len(owners) > 1:
        problems.append(
            f"{path}: at most one technique may own the decode loop (generate), got {', '.join(owners)}"
        )
    return problems


def _validate_measured(measured: Any, problems: list[str]) -> None:
    if not _check_mapping(measured, "measured", problems):
        return
    for key in ("baseline", "tuned"):
        if key not in measured:
            problems.append(f"measured.{key}: missing")
    for label, metrics in measured.items():
        path = f"measured.{label}"
        if not _check_mapping(metrics, path, problems):
            continue
        for key, value in metrics.items():
            p = f"{path}.{key}"
            if key == "quality_metric":
                _check_str(value, p, problems, nullable=True)
            elif why := _metric_unit_problem(key):
                problems.append(f"{p}: {why}")
            elif value is not None and not _is_finite_number(value):
                problems.append(f"{p}: must be a finite number or null, got {value!r}")


def _validate_provenance(prov: Any, problems: list[str]) -> None:
    if not _check_mapping(prov, "provenance", problems):
        return
    for key in ("tool_version", "created_at"):
        if key not in prov:
            problems.append(f"provenance.{key}: missing")
    if "tool_version" in prov:
        _check_str(prov["tool_version"], "provenance.tool_version", problems)
    if "created_at" in prov and _parse_timestamp(prov["created_at"]) is None:
        problems.append(f"provenance.created_at: must be an ISO 8601 timestamp, got {prov['created_at']!r}")
    for key in ("study", "storage"):
        if key in prov:
            _check_str(prov[key], f"provenance.{key}", problems, nullable=True)
    for key in ("trial", "seed"):
        if key in prov and prov[key] is not None and not is_int(prov[key]):
            problems.append(f"provenance.{key}: must be an integer or null, got {prov[key]!r}")
    for key, value in prov.items():
        if key not in _PROVENANCE_KNOWN:
            _check_plain(value, f"provenance.{key}", problems)


def validate_policy_dict(d: Any) -> list[str]:
    """Every problem of a raw policy mapping (as loaded from YAML), each prefixed with its field path.

    An empty list means ``policy_from_dict(d)`` will succeed. A newer ``schema_version`` than this code
    supports stops validation there: the rest of such a file follows rules we do not know.
    """
    problems: list[str] = []
    if not isinstance(d, dict):
        return [f"top level must be a mapping, got {_type_name(d)}"]
    if "schema_version" not in d:
        problems.append("schema_version: missing")
    else:
        version = d["schema_version"]
        if not is_int(version):
            problems.append(f"schema_version: must be an integer, got {version!r}")
        elif version > SCHEMA_VERSION:
            return [
                f"schema_version: {version} is newer than this autotune supports ({SCHEMA_VERSION});"
                " upgrade autotune to read this policy"
            ]
        elif version < 1:
            problems.append(f"schema_version: must be >= 1, got {version}")
    for key in _TOP_REQUIRED[1:]:
        if key not in d:
            problems.append(f"{key}: missing")
    for key in d:
        if key not in _TOP_KEYS:
            problems.append(f"{key}: unknown field (known: {', '.join(_TOP_KEYS)})")
    if "model" in d:
        _validate_model(d["model"], problems)
    if "device" in d:
        _validate_device(d["device"], problems)
    if "workload" in d:
        _validate_workload(d["workload"], problems)
    if "objective" in d:
        _validate_objective(d["objective"], problems)
    if "techniques" in d:
        problems.extend(validate_techniques(d["techniques"]))
    if "measured" in d and d["measured"] is not None:
        _validate_measured(d["measured"], problems)
    if "provenance" in d:
        _validate_provenance(d["provenance"], problems)
    return problems


# ------------------------------------------------------------------------------------------ conversion


def _normalise_timestamp(value: Any) -> str:
    """Keep strings verbatim (exact round trip); YAML-parsed unquoted timestamps become ISO strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    return value.isoformat()  # a date


def policy_from_dict(d: Any, *, source: str | None = None) -> Policy:
    """Build a ``Policy`` from a raw mapping; ``PolicyError`` listing all problems (with ``source``)."""
    problems = validate_policy_dict(d)
    if problems:
        raise PolicyError(problems, source)
    d = copy.deepcopy(d)  # the Policy must not alias the caller's (or the YAML loader's) objects
    model, wl, obj, prov = d["model"], d["workload"], d["objective"], d["provenance"]
    return Policy(
        schema_version=d["schema_version"],
        model=ModelSpec(id=model["id"], fingerprint={k: model["fingerprint"][k] for k in FINGERPRINT_FIELDS}),
        device=d["device"],
        workload=Workload(
            batch_size=wl["batch_size"],
            prompt_tokens=wl["prompt_tokens"],
            new_tokens=wl["new_tokens"],
            dtype=wl["dtype"],
            task=wl.get("task"),
        ),
        objective=Objective(
            metric=obj["metric"],
            direction=obj["direction"],
            quality_metric=obj["quality_metric"],
            quality_budget=obj["quality_budget"],
            budget_met=obj.get("budget_met"),
        ),
        techniques=d["techniques"],
        measured=d.get("measured"),
        provenance=Provenance(
            tool_version=prov["tool_version"],
            created_at=_normalise_timestamp(prov["created_at"]),
            study=prov.get("study"),
            storage=prov.get("storage"),
            trial=prov.get("trial"),
            seed=prov.get("seed"),
            extra={k: v for k, v in prov.items() if k not in _PROVENANCE_KNOWN},
        ),
    )


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The canonical plain-data form of ``policy`` (see the module docstring); deep-copied."""
    prov = policy.provenance
    provenance: dict[str, Any] = {"tool_version": prov.tool_version}
    for key in ("study", "storage", "trial", "seed"):
        _put_optional(provenance, key, getattr(prov, key))
    provenance["created_at"] = prov.created_at
    for key, value in prov.extra.items():
        if key not in provenance:
            provenance[key] = value
    fingerprint = dict(policy.model.fingerprint)
    ordered_fp = {k: fingerprint.pop(k) for k in FINGERPRINT_FIELDS if k in fingerprint}
    ordered_fp.update(fingerprint)  # unknown keys last (validation will name them)
    out: dict[str, Any] = {
        "schema_version": policy.schema_version,
        "model": {"id": policy.model.id, "fingerprint": ordered_fp},
        "device": policy.device,
        "workload": policy.workload.as_dict(),
        "objective": policy.objective.as_dict(),
        "techniques": policy.techniques,
    }
    _put_optional(out, "measured", policy.measured)
    out["provenance"] = provenance
    return copy.deepcopy(out)


# ----------------------------------------------------------------------------------------- JSON Schema

_JSON_SCHEMA_FILE = Path(__file__).with_name("policy.schema.json")


def _metrics_schema() -> dict[str, Any]:
    suffixes = "|".join(s[1:] for s in UNIT_SUFFIXES)
    return {
        "type": "object",
        "description": "Measured numbers; the unit is the key's suffix (ttft_ms, tokens_per_s, peak_memory_mb).",
        "properties": {
            "quality": {"type": ["number", "null"], "description": "Score in the points of quality_metric."},
            "quality_metric": {"type": ["string", "null"]},
        },
        "patternProperties": {f"_({suffixes})$": {"type": ["number", "null"]}},
        "additionalProperties": False,
    }


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a policy file, for editor completion and linting.

    Only the built-in technique runtimes contribute section schemas, so the committed
    ``policy.schema.json`` does not depend on what a process happens to register at run time. The
    Python validator (``validate_policy_dict``) remains the authority; this schema is a convenience.
    """
    nonempty = {"type": "string", "minLength": 1}
    pos_int = {"type": "integer", "minimum": 1}
    technique_props: dict[str, Any] = {}
    for name in builtin_runtime_names():
        section = get_runtime(name).json_schema() or {"type": "object"}
        technique_props[name] = section
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:autotune:policy:v{SCHEMA_VERSION}",
        "title": "autotune policy",
        "description": "A tuned inference policy for one model on one device (written by `autotune tune`).",
        "type": "object",
        "required": list(_TOP_REQUIRED),
        "additionalProperties": False,
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "model": {
                "type": "object",
                "required": list(_MODEL_KEYS),
                "additionalProperties": False,
                "properties": {
                    "id": {**nonempty, "description": "builtin:NAME, a Hugging Face id or a local path."},
                    "fingerprint": {
                        "type": "object",
                        "required": list(FINGERPRINT_FIELDS),
                        "additionalProperties": False,
                        "properties": {
                            k: (pos_int if k in _FINGERPRINT_INT_FIELDS else nonempty) for k in FINGERPRINT_FIELDS
                        },
                    },
                },
            },
            "device": {
                "type": "object",
                "description": "Flat device fingerprint (profilers.device.DeviceFingerprint.to_dict()).",
                "required": ["id", "kind", "name"],
                "properties": {
                    "id": nonempty,
                    "kind": {"enum": list(DEVICE_KINDS)},
                    "name": nonempty,
                    "index": {"type": ["integer", "null"], "minimum": 0},
                },
            },
            "workload": {
                "type": "object",
                "required": list(_WORKLOAD_KEYS[:4]),
                "additionalProperties": False,
                "properties": {
                    "batch_size": pos_int,
                    "prompt_tokens": pos_int,
                    "new_tokens": pos_int,
                    "dtype": {"enum": list(WORKLOAD_DTYPES)},
                    "task": {"type": ["string", "null"]},
                },
            },
            "objective": {
                "type": "object",
                "required": list(_OBJECTIVE_KEYS[:4]),
                "additionalProperties": False,
                "properties": {
                    "metric": {**nonempty, "examples": ["ttft_ms", "latency_ms", "tokens_per_s"]},
                    "direction": {"enum": list(DIRECTIONS)},
                    "quality_metric": {"type": ["string", "null"]},
                    "quality_budget": {
                        "type": "number",
                        "minimum": 0,
                        "description": "Largest allowed quality drop versus dense, in quality_metric points.",
                    },
                    "budget_met": {"type": ["boolean", "null"]},
                },
            },
            "techniques": {
                "type": "object",
                "description": "Technique name -> section; {} is the dense model. Validated by the runtime.",
                "properties": technique_props,
                "additionalProperties": {"type": "object"},
            },
            "measured": {
                "type": "object",
                "required": ["baseline", "tuned"],
                "additionalProperties": {"$ref": "#/$defs/metrics"},
            },
            "provenance": {
                "type": "object",
                "required": ["tool_version", "created_at"],
                "properties": {
                    "tool_version": nonempty,
                    "study": {"type": ["string", "null"]},
                    "storage": {"type": ["string", "null"]},
                    "trial": {"type": ["integer", "null"]},
                    "seed": {"type": ["integer", "null"]},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
        },
        "$defs": {"metrics": _metrics_schema()},
    }


def render_policy_json_schema() -> str:
    """The exact text of ``policies/policy.schema.json`` (a test keeps the committed file in sync)."""
    return json.dumps(policy_json_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m policies.schema [--check] [PATH]``: write (or check) the JSON Schema file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m policies.schema", description=main.__doc__)
    parser.add_argument("path", nargs="?", default=str(_JSON_SCHEMA_FILE))
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text, path = render_policy_json_schema(), Path(args.path)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(f"{path}: out of date; run `python -m policies.schema`")
            return 1
        print(f"{path}: up to date")
        return 0
    from policies.io import atomic_write_text

    atomic_write_text(path, text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
