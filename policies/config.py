"""Technique config classes: each section's schema written once, as field metadata on a dataclass.

A technique's section of a policy file (``techniques.token_retention: {keep: [...], window: 8}``) is described
by one frozen dataclass, in the shape of kvpress presses and torchao configs::

    @dataclass(frozen=True, kw_only=True)
    class TokenRetentionConfig(TechniqueConfig):
        technique: ClassVar[str] = "token_retention"
        keep: tuple[float, ...] = required(ListOf(Number(gt=0, le=1), min_items=1), "fraction kept per layer")
        window: int = option(8, Int(min=1), "the last w prompt tokens score the others")

        def check(self, path: str) -> list[str]:      # rules across fields, on an already well-typed object
            ...

Everything else derives from those fields, so the copies cannot disagree:

- ``section_problems(section, path)``: every problem of a raw section, each starting with its field path
  (``techniques.token_retention.keep[3]: must be a number in (0, 1], got 1.5``); unknown fields are refused;
- ``from_section(section)``: the typed object (lists become tuples, nested mappings nested configs), or a
  ``PolicyError`` listing every problem; ``to_section()`` writes it back (defaults left out);
- ``defaults()`` and ``json_schema()``: the JSON Schema section (``additionalProperties: false``) that
  ``policy.schema.json`` is generated from.

A field's *spec* (``Int``, ``Number``, ``Choice``, ``Text``, ``Nullable``, ``ListOf``, ``Rows``, ``Section``,
``Tagged``, ``Mapping``) checks one value, converts it and describes it in JSON Schema. Search spaces import
the constants the specs are built from (choices, bounds) instead of repeating them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping as MappingABC
from typing import Any, ClassVar, TypeVar

from policies.schema import PolicyError, is_int, is_number

__all__ = [
    "Choice",
    "Int",
    "ListOf",
    "Mapping",
    "Nullable",
    "Number",
    "Rows",
    "Section",
    "Spec",
    "Tagged",
    "TechniqueConfig",
    "Text",
    "is_int",
    "option",
    "required",
]

C = TypeVar("C", bound="TechniqueConfig")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ------------------------------------------------------------------------------------------------ specs


class Spec:
    """How one field's value is checked, converted to the config's form, written back and described."""

    def expected(self) -> str:
        """What a valid value is, for messages: ``an integer >= 1``."""
        raise NotImplementedError

    def plural(self) -> str:
        """The same for several values (lists, rows): ``integers >= 1``."""
        return f"values, each {self.expected()}"

    def ok(self, value: Any) -> bool:
        """Whether a scalar ``value`` is valid (containers override ``problems`` instead)."""
        raise NotImplementedError

    def problems(self, value: Any, path: str) -> list[str]:
        return [] if self.ok(value) else [f"{path}: must be {self.expected()}, got {value!r}"]

    def load(self, value: Any) -> Any:
        """The config's form of a valid YAML value (scalars as they are)."""
        return value

    def dump(self, value: Any) -> Any:
        """The YAML form of a config value (inverse of ``load``)."""
        return value

    def json_schema(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    min: int | None = None
    max: int | None = None

    def expected(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in {self.min}..{self.max}"
        if self.min is not None:
            return f"an integer >= {self.min}"
        return f"an integer <= {self.max}" if self.max is not None else "an integer"

    def plural(self) -> str:
        return "integers" + self.expected().removeprefix("an integer")

    def ok(self, value: Any) -> bool:
        return (is_int(value) and (self.min is None or value >= self.min)
                and (self.max is None or value <= self.max))

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        if self.min is not None:
            out["minimum"] = self.min
        if self.max is not None:
            out["maximum"] = self.max
        return out


@dataclasses.dataclass(frozen=True)
class Number(Spec):
    """A finite number; bounds ``gt``/``ge`` below and ``lt``/``le`` above (at most one of each)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def expected(self) -> str:
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None
        if low and high:
            return f"a number in {low}, {high}"
        if low:
            return f"a number {'>' if self.gt is not None else '>='} {low[1:]}"
        if high:
            return f"a number {'<' if self.lt is not None else '<='} {high[:-1]}"
        return "a finite number"

    def plural(self) -> str:
        expected = self.expected()
        return "finite numbers" if expected == "a finite number" else "numbers" + expected.removeprefix("a number")

    def ok(self, value: Any) -> bool:
        if not is_number(value) or not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "number"}
        for key, bound in (("exclusiveMinimum", self.gt), ("minimum", self.ge), ("exclusiveMaximum", self.lt),
                           ("maximum", self.le)):
            if bound is not None:
                out[key] = bound
        return out


@dataclasses.dataclass(frozen=True)
class Choice(Spec):
    values: tuple[Any, ...]

    def expected(self) -> str:
        return f"one of {', '.join(str(v) for v in self.values)}"

    def ok(self, value: Any) -> bool:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in self.values

    def json_schema(self) -> dict[str, Any]:
        return {"enum": list(self.values)}


@dataclasses.dataclass(frozen=True)
class Text(Spec):
    """A non-empty string."""

    def expected(self) -> str:
        return "a non-empty string"

    def plural(self) -> str:
        return "non-empty strings"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}


@dataclasses.dataclass(frozen=True)
class Mapping(Spec):
    """Free-form plain data (e.g. provenance notes); the policy validator already checks it is plain data."""

    def expected(self) -> str:
        return "a mapping"

    def ok(self, value: Any) -> bool:
        return isinstance(value, MappingABC)

    def load(self, value: Any) -> Any:
        return copy.deepcopy(dict(value))  # the config must not alias the caller's (or the YAML loader's) data

    def json_schema(self) -> dict[str, Any]:
        return {"type": "object"}


@dataclasses.dataclass(frozen=True)
class Nullable(Spec):
    """``inner`` or null."""

    inner: Spec

    def expected(self) -> str:
        return f"{self.inner.expected()} or null"

    def problems(self, value: Any, path: str) -> list[str]:
        if value is None:
            return []
        found = self.inner.problems(value, path)
        if found and (isinstance(self.inner, (Int, Number, Choice, Text))
                      or (isinstance(self.inner, ListOf) and self.inner.what)):
            return [f"{path}: must be {self.expected()}, got {value!r}"]  # one message for a value read as a whole
        return found

    def load(self, value: Any) -> Any:
        return None if value is None else self.inner.load(value)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)

    def json_schema(self) -> dict[str, Any]:
        return {"anyOf": [self.inner.json_schema(), {"type": "null"}]}


@dataclasses.dataclass(frozen=True)
class ListOf(Spec):
    """A list (or tuple) of ``item``; loaded as a tuple. ``what`` overrides the message's description."""

    item: Spec
    min_items: int = 0
    max_items: int | None = None
    what: str | None = None

    def expected(self) -> str:
        if self.what:
            return self.what
        if self.max_items is not None and self.max_items == self.min_items:
            return f"a list of {self.min_items} {self.item.plural()}"
        size = {0: "", 1: "non-empty "}.get(self.min_items, f"at-least-{self.min_items}-item ")
        most = f" (at most {self.max_items})" if self.max_items is not None else ""
        return f"a {size}list of {self.item.plural()}{most}"

    def problems(self, value: Any, path: str) -> list[str]:
        if (not isinstance(value, (list, tuple)) or len(value) < self.min_items
                or (self.max_items is not None and len(value) > self.max_items)):
            return [f"{path}: must be {self.expected()}, got {value!r}"]
        return [p for i, v in enumerate(value) for p in self.item.problems(v, f"{path}[{i}]")]

    def load(self, value: Any) -> Any:
        return tuple(self.item.load(v) for v in value)

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.json_schema()}
        if self.min_items:
            out["minItems"] = self.min_items
        if self.max_items is not None:
            out["maxItems"] = self.max_items
        return out


@dataclasses.dataclass(frozen=True)
class Rows(Spec):
    """One row per layer, each with one ``cell`` per named column (``[qkv, o, gate_up, down]``); a bad cell
    is named by its column: ``levels[3].gate_up``. Loaded as a tuple of tuples."""

    columns: tuple[str, ...]
    cell: Spec

    def expected(self) -> str:
        return f"a non-empty list with one [{', '.join(self.columns)}] row per layer"

    def problems(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, (list, tuple)) or not value:
            return [f"{path}: must be {self.expected()}, got {_short(value)}"]
        problems = []
        for i, row in enumerate(value):
            if not isinstance(row, (list, tuple)) or len(row) != len(self.columns):
                problems.append(f"{path}[{i}]: must be a list of {len(self.columns)} {self.cell.plural()} "
                                f"({', '.join(self.columns)}), got {_short(row)}")
                continue
            for column, cell in zip(self.columns, row, strict=True):
                problems += self.cell.problems(cell, f"{path}[{i}].{column}")
        return problems

    def load(self, value: Any) -> Any:
        return tuple(tuple(self.cell.load(c) for c in row) for row in value)

    def dump(self, value: Any) -> Any:
        return [[self.cell.dump(c) for c in row] for row in value]

    def json_schema(self) -> dict[str, Any]:
        n = len(self.columns)
        return {"type": "array", "minItems": 1, "description": f"per layer: [{', '.join(self.columns)}]",
                "items": {"type": "array", "minItems": n, "maxItems": n, "items": self.cell.json_schema()}}


@dataclasses.dataclass(frozen=True)
class Section(Spec):
    """A nested mapping described by another config class (loaded as that class)."""

    config: type[TechniqueConfig]

    def expected(self) -> str:
        return "a mapping"

    def problems(self, value: Any, path: str) -> list[str]:
        return self.config.section_problems(value, path)

    def load(self, value: Any) -> Any:
        return self.config.build(value)

    def dump(self, value: Any) -> Any:
        return value.to_section()

    def json_schema(self) -> dict[str, Any]:
        return self.config.json_schema()


@dataclasses.dataclass(frozen=True)
class Tagged(Spec):
    """A nested mapping whose ``tag`` field picks its config class (``tree: {kind: static, parents: [...]}``)."""

    tag: str
    variants: dict[str, type[TechniqueConfig]]

    def expected(self) -> str:
        return f"a mapping with {self.tag}: {' or '.join(self.variants)}"

    def problems(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, MappingABC):
            return [f"{path}: must be {self.expected()}, got {_type_name(value)}"]
        kind = value.get(self.tag)
        if not isinstance(kind, str) or kind not in self.variants:
            return [f"{path}.{self.tag}: must be one of {', '.join(self.variants)}, got {kind!r}"]
        return self.variants[kind].section_problems(value, path)

    def load(self, value: Any) -> Any:
        return self.variants[value[self.tag]].build(value)

    def dump(self, value: Any) -> Any:
        return value.to_section()

    def json_schema(self) -> dict[str, Any]:
        return {"oneOf": [cls.json_schema() for cls in self.variants.values()]}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------ fields

_SPEC, _DOC, _REQUIRED, _JSON = "autotune.spec", "autotune.doc", "autotune.required", "autotune.json"


def option(default: Any, spec: Spec, doc: str, *, json_extra: dict[str, Any] | None = None) -> Any:
    """A field with a default: what a section that leaves it out means."""
    return dataclasses.field(default=default, metadata={_SPEC: spec, _DOC: doc, _JSON: json_extra or {}})


def required(spec: Spec, doc: str, *, json_extra: dict[str, Any] | None = None) -> Any:
    """A field every section must give (``doc`` is repeated in the 'required' message)."""
    return dataclasses.field(metadata={_SPEC: spec, _DOC: doc, _REQUIRED: True, _JSON: json_extra or {}})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TechniqueConfig:
    """Base of every technique's config class (and of nested parts such as a speculative tree)."""

    #: The section's key under ``techniques:`` (empty for nested parts); paths in messages start there.
    technique: ClassVar[str] = ""
    #: One line for the JSON Schema (editors show it).
    description: ClassVar[str] = ""

    @classmethod
    def config_fields(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if _SPEC in f.metadata]

    @classmethod
    def section_path(cls) -> str:
        return f"techniques.{cls.technique}"

    @classmethod
    def section_problems(cls, section: Any, path: str | None = None) -> list[str]:
        """Every problem of a raw ``section``, each starting with its field path; [] when it is valid."""
        path = path or cls.section_path()
        if not isinstance(section, MappingABC):
            return [f"{path}: must be a mapping, got {_type_name(section)}"]
        fields = cls.config_fields()
        names = [f.name for f in fields]
        problems = [f"{path}.{k}: unknown field (known: {', '.join(names)})" for k in section if k not in names]
        for f in fields:
            if f.name not in section:
                if f.metadata.get(_REQUIRED):
                    problems.append(f"{path}.{f.name}: required ({f.metadata[_DOC]})")
                continue
            problems += f.metadata[_SPEC].problems(section[f.name], f"{path}.{f.name}")
        if problems:
            return problems
        return list(cls.build(section).check(path))

    @classmethod
    def build(cls: type[C], section: MappingABC[str, Any]) -> C:
        """The object of a section whose fields are already checked (``check()`` not run)."""
        return cls(**{f.name: f.metadata[_SPEC].load(section[f.name]) for f in cls.config_fields()
                      if f.name in section})

    @classmethod
    def from_section(cls: type[C], section: Any, path: str | None = None) -> C:
        """The validated object of ``section``; ``PolicyError`` naming every problem otherwise."""
        problems = cls.section_problems(section, path)
        if problems:
            raise PolicyError(problems)
        return cls.build(section)

    def to_section(self) -> dict[str, Any]:
        """The section's YAML form: required fields and every field that differs from its default."""
        out: dict[str, Any] = {}
        for f in self.config_fields():
            value = getattr(self, f.name)
            if f.metadata.get(_REQUIRED) or value != f.default:
                out[f.name] = f.metadata[_SPEC].dump(value)
        return out

    def check(self, path: str) -> list[str]:
        """Rules across fields (each field is already valid on its own); override in a technique's class."""
        return []

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The optional fields' values when a section leaves them out (YAML form)."""
        return {f.name: f.metadata[_SPEC].dump(f.default) for f in cls.config_fields()
                if not f.metadata.get(_REQUIRED)}

    @classmethod
    def field_doc(cls, name: str) -> str:
        return next(f.metadata[_DOC] for f in cls.config_fields() if f.name == name)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of the section: its fields, their bounds, defaults and docs."""
        properties: dict[str, Any] = {}
        for f in cls.config_fields():
            prop = {**f.metadata[_SPEC].json_schema(), **f.metadata[_JSON], "description": f.metadata[_DOC]}
            if not f.metadata.get(_REQUIRED):
                prop["default"] = f.metadata[_SPEC].dump(f.default)
            properties[f.name] = prop
        out: dict[str, Any] = {"type": "object"}
        if cls.description:
            out["description"] = cls.description
        needed = [f.name for f in cls.config_fields() if f.metadata.get(_REQUIRED)]
        if needed:
            out["required"] = needed
        out["additionalProperties"] = False
        out["properties"] = properties
        return out

