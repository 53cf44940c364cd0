"""The package's shape: layers whose imports point only down, no import circles, and no knowledge of a
method family outside the method code (docs/design.md §6)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tbptt_bench"

# Bottom to top. A module may import from its own layer or any layer below it.
LAYERS: list[set[str]] = [
    {"errors", "atomic", "registry", "provenance", "seeding", "validation", "options"},
    {"tasks"},
    {"models"},
    {"core"},
    {"methods"},
    {"analysis"},
    {"training"},
    {"perf"},
    {"suites"},
    {"report"},
    {"api", "loop", "lightning", "__init__"},
    {"commands", "cli", "asv_compare"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer: add its folder to LAYERS in {__file__}")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports at run time (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "tbptt_bench":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        deps = imports_of(path, known)
        # importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages that contain the
        # importing module itself: they are already being imported when it runs
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        expanded = set()
        for dep in deps:
            parts = dep.split(".")
            expanded.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {d for d in expanded - own if d in known and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{mod} -> {dep}"
        for mod, deps in import_graph().items()
        for dep in deps
        if _layer(dep) > _layer(mod)
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


FAMILY_COMPARISON = re.compile(r"""family\s*(==|!=|\bin\b)\s*[\(\["']""")
SPEC_PARSING = re.compile(r"""\bspecs?\w*\.(split|partition)\(""")


@pytest.mark.parametrize("pattern", [FAMILY_COMPARISON, SPEC_PARSING], ids=["family-names", "spec-parsing"])
def test_method_knowledge_stays_in_the_method_code(pattern: re.Pattern[str]) -> None:
    leaks = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                leaks.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not leaks, "method knowledge outside tbptt_bench/methods/:\n" + "\n".join(leaks)


def test_docstrings_cite_the_design_in_the_repository() -> None:
    outside = [str(p) for p in PACKAGE.rglob("*.py") if "DESIGN.md" in p.read_text()]
    assert not outside, f"cite docs/design.md, not an outside file: {outside}"
    assert (PACKAGE.parent / "docs" / "design.md").is_file()
