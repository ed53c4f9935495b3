"""The import rules between packages (docs/INTERFACES.md, DESIGN.md "Conventions"), checked on the source.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, and
`importlib.import_module("a.literal")`; relative imports are resolved against the file's package. A rule
is a package whose files may not import some modules; a violation names file:line, the module and the rule.

- `profilers/` (the core profilers: device, timing, model parts, per-layer profiler, peak memory, hf_compat)
  imports nothing of the project outside `profilers/`: every other package builds on it.
- `policies/` imports nothing from `tuner/`, `search_spaces/` or `reports/`, nor optuna, matplotlib, plotly,
  pandas: the inference path stays light.
- `search_spaces/` imports nothing from `tuner/` or `reports/`: the tuner hands it timing inputs,
  calibration texts, task examples and a generation timer through `SearchContext.inputs`.
- `reports/` reads files only: nothing from `tuner/`, `search_spaces/`, `profilers/`, and of `policies/`
  only its file-reading modules `policies.io` and `policies.schema`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("benchmarks", "policies", "profilers", "reports", "scripts", "search_spaces", "tests", "tuner")


@dataclass(frozen=True)
class Rule:
    """Files under `package/` may not import a module under any of `forbidden` (dotted prefixes), except
    modules under one of `allowed` (more specific prefixes)."""

    package: str
    forbidden: tuple[str, ...]
    text: str
    allowed: tuple[str, ...] = ()

    def breaks(self, module: str) -> bool:
        return _under(module, self.forbidden) and not _under(module, self.allowed)


RULES = (
    Rule("profilers", tuple(p for p in PROJECT if p != "profilers"),
         "the core profilers import nothing else of the project"),
    Rule("policies", ("tuner", "search_spaces", "reports", "optuna", "matplotlib", "plotly", "pandas"),
         "policies/ imports nothing from tuner/, search_spaces/, reports/, nor optuna or plotting/pandas"),
    Rule("search_spaces", ("tuner", "reports"),
         "search_spaces/ imports nothing from tuner/ or reports/ (the tuner lends SearchContext.inputs)"),
    Rule("reports", ("tuner", "search_spaces", "profilers", "policies"),
         "reports/ reads files only: nothing from tuner/, search_spaces/, profilers/, and of policies/ only io, "
         "schema", allowed=("policies.io", "policies.schema")),
)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imported_modules(source: str, package: str = "") -> list[tuple[int, str, str]]:
    """(line, dotted module, statement) of every import in `source`, wherever it sits in the file. `package`
    is the file's own package (dotted), for relative imports. `from a import b` yields module `a.b` (b may be
    a module: `from policies import io` is policies.io)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, f"import {alias.name}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x` is the file's package; each further dot goes one package up
                parts = package.split(".") if package else []
                parts = parts[:max(0, len(parts) - (node.level - 1))]
                base = ".".join(p for p in (*parts, base) if p)
            found.extend((node.lineno, f"{base}.{alias.name}" if base else alias.name,
                          f"from {'.' * node.level}{node.module or ''} import {alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value, f"import_module({arg.value!r})"))
    return sorted(found)


def _is_import_module(func: ast.expr) -> bool:
    """`importlib.import_module(...)` or a bare `import_module(...)` (imported from importlib)."""
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def violations(source: str, path: str, package: str) -> list[str]:
    """`path:line: STATEMENT: RULE` for every import in `source` that a rule for `package` forbids."""
    top = package.split(".")[0]
    out = []
    for rule in (r for r in RULES if r.package == top):
        for line, module, statement in imported_modules(source, package):
            if rule.breaks(module):
                out.append(f"{path}:{line}: {statement}: {rule.text}")
    return out


def test_the_packages_keep_the_import_rules():
    problems = []
    for package in sorted({rule.package for rule in RULES}):
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no Python files under {package}/"
        for path in files:
            rel = path.relative_to(ROOT)
            # The file's own package (dotted): its directory, for `__init__.py` and modules alike.
            problems.extend(violations(path.read_text(), str(rel), ".".join(rel.parts[:-1])))
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def test_the_scanner_catches_imports_wherever_they_hide():
    source = "\n".join([
        "from __future__ import annotations",
        "import torch",
        "from typing import TYPE_CHECKING",
        "from policies.sparsity import GROUPS",  # allowed
        "if TYPE_CHECKING:",
        "    from tuner.models import LoadedModel",  # line 6
        "def f():",
        "    import tuner.workload",  # line 8
        "    import importlib",
        "    return importlib.import_module('reports.report')",  # line 10
        "def g():",
        "    from ..tuner import tasks",  # line 12: relative, resolves to tuner.tasks
        "    from importlib import import_module",
        "    import_module('tuner.cli')",  # line 14
    ])
    found = violations(source, "search_spaces/x.py", "search_spaces")
    assert [v.split(": ")[0] for v in found] == [f"search_spaces/x.py:{n}" for n in (6, 8, 10, 12, 14)], found
    assert found[0] == "search_spaces/x.py:6: from tuner.models import LoadedModel: " + RULES[2].text
    assert "import_module('reports.report')" in found[2] and "from ..tuner import tasks" in found[3]
    assert violations("import torch\nfrom policies.sparsity import GROUPS\n", "search_spaces/y.py",
                      "search_spaces") == []


def test_each_rule_bites():
    assert violations("def f():\n    import pandas\n", "policies/x.py", "policies") == [
        "policies/x.py:2: import pandas: " + RULES[1].text]
    assert violations("from profilers.timing import synchronize\n", "profilers/x.py", "profilers") == []
    assert violations("from policies.schema import Policy\n", "profilers/x.py", "profilers")
    assert violations("from policies.io import read_policy_dict\nfrom policies.schema import Policy\n",
                      "reports/x.py", "reports") == []
    assert [v.split(": ")[1] for v in violations(
        "from policies import apply_policy\nfrom profilers.device import resolve_device\n",
        "reports/x.py", "reports")] == ["from policies import apply_policy",
                                        "from profilers.device import resolve_device"]
    assert violations("from policies import io\n", "reports/x.py", "reports") == []
