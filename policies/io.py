"""Policy files on disk: safe YAML in, atomic YAML out.

Loading uses ``yaml.safe_load`` only (policies travel between machines and users; nothing in them may
construct Python objects). Every failure becomes a one-line ``PolicyError`` naming the file, so the CLI can
print it as is. Saving writes a temporary file in the target directory, fsyncs it and ``os.replace``s it over
the target: a reader (or a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from policies.schema import (
    SCHEMA_VERSION,
    TOOL_NAME,
    Policy,
    PolicyError,
    policy_from_dict,
    policy_to_dict,
    validate_policy_dict,
)
from policies.schema import tool_version as _tool_version

__all__ = ["atomic_write_text", "dump_policy_yaml", "load_policy_file", "read_policy_dict", "save_policy"]


def _yaml_error_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML ({where}{' '.join(str(problem).split())})"


def read_policy_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``path`` as a YAML mapping without validating it as a policy (``PolicyError`` otherwise)."""
    p, source = Path(path), str(path)
    if not p.exists():
        raise PolicyError("no such file", source)
    if p.is_dir():
        raise PolicyError("is a directory, not a policy file", source)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read ({exc.strerror or exc})", source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"not UTF-8 text (byte {exc.start})", source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(_yaml_error_message(exc), source) from None
    if data is None:
        raise PolicyError("empty file", source)
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise PolicyError(f"top level must be a mapping, got {kind}", source)
    return data


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Load and validate one policy file; ``PolicyError`` (naming the file) on any problem."""
    policy = policy_from_dict(read_policy_dict(path), source=str(path))
    policy.source = str(path)
    return policy


class _PolicyDumper(yaml.SafeDumper):
    """Safe dumper that writes lists of scalars in flow style (``keep: [1.0, 0.5, 0.5]``): per-layer lists
    stay one line and diff well, while nested mappings stay in block style for readability."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, (str, int, float, bool)) or x is None for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PolicyDumper.add_representer(list, _represent_list)


def dump_policy_yaml(policy: Policy) -> str:
    """The exact text ``save_policy`` writes (validated first: an invalid policy is never written)."""
    data = policy_to_dict(policy)
    problems = validate_policy_dict(data)
    if problems:
        raise PolicyError(problems, "policy not saved")
    header = f"# {TOOL_NAME} policy, schema_version {SCHEMA_VERSION} (written by {TOOL_NAME} {_tool_version()})\n"
    body = yaml.dump(
        data, Dumper=_PolicyDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100
    )
    return header + body


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Creates parent directories. On any failure the temp file is removed and the old file (if any) is
    left untouched. The new file keeps the old file's permissions (else 0o644), since ``mkstemp`` would
    otherwise make shared policy files private.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> Path:
    """Validate ``policy`` and write it to ``path`` atomically (parents created); returns the path."""
    atomic_write_text(path, dump_policy_yaml(policy))
    return Path(path)
