"""Every third-party import of the project is declared in pyproject.toml.

A fresh machine has only what the project declares; a package installed by hand on a developer's machine
(or on CI's) must not stand in for a missing declaration. This scans the imports of the package, the tests,
the benchmarks and the examples, maps each imported top-level name to the distribution that provides it,
and fails on any distribution that is neither a runtime dependency nor in an extra.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tbptt_bench", "tests", "benchmarks", "examples")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def declared_distributions(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{normalised distribution name: where it is declared}`` (``dependencies`` or ``extra <name>``)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    where = {_requirement_name(r): "dependencies" for r in project.get("dependencies", [])}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        for r in requirements:
            where.setdefault(_requirement_name(r), f"extra {extra}")
    return where


def _local_modules() -> set[str]:
    """Names importable from the checkout itself: the package, test helpers, benchmark modules."""
    names = {"tbptt_bench"}
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            names.add(path.stem)
        names.update(p.name for p in (ROOT / folder).rglob("*") if p.is_dir())
    return names


def imported_top_names(path: Path) -> set[str]:
    """Top-level module names imported (absolutely) anywhere in ``path``, inside functions too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, list[str]]:
    """``{top-level name: [files importing it]}`` for every import that is neither stdlib nor local."""
    local = _local_modules()
    found: dict[str, list[str]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in imported_top_names(path):
                if name in sys.stdlib_module_names or name in local or name == "__future__":
                    continue
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python >= 3.11")
def test_every_third_party_import_is_declared() -> None:
    declared = declared_distributions()
    providers = metadata.packages_distributions()
    undeclared = []
    for name, files in sorted(third_party_imports().items()):
        dists = providers.get(name) or ([name] if _normalise(name) in declared else None)
        if not dists:
            undeclared.append(f"{name} (not installed here, so its distribution is unknown; imported by {files[0]})")
        elif not any(_normalise(d) in declared for d in dists):
            undeclared.append(f"{name} (distribution {dists[0]}; imported by {files[0]})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_the_scan_sees_imports_in_functions_and_skips_relative_ones(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os, numpy.linalg\nfrom . import sibling\n\ndef f():\n    from scipy import stats\n")
    assert imported_top_names(source) == {"os", "numpy", "scipy"}


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python >= 3.11")
def test_requirement_names_are_normalised(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["Torch>=2.2,<2.15", "ray[default]>=2.9"]\n'
                         '[project.optional-dependencies]\ndev = ["typing_extensions; python_version<\'3.11\'"]\n')
    assert declared_distributions(pyproject) == {"torch": "dependencies", "ray": "dependencies",
                                                 "typing-extensions": "extra dev"}
