"""Every fenced Python block of README.md and docs/*.md runs.

The blocks of one file run in order in one fresh interpreter (a later block may use what an earlier one
defined), in a scratch folder where the README's quick suite has been run (``results/quick`` exists, as the
docs assume). A block opts out with a visible marker on the line before its fence,
``<!-- not run: REASON -->``, and the reason must be given.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
OPT_OUT = re.compile(r"<!-- not run: (.*?) -->\s*$")

#: Runs each block with its file and line in tracebacks, stopping at the first failure.
DRIVER = """
import json, sys
blocks = json.load(sys.stdin)
namespace = {"__name__": "__docs__"}
for name, code in blocks:
    exec(compile(code, name, "exec"), namespace)
"""


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, opt-out reason or None)`` for each ```python block of ``path``."""
    text = path.read_text()
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = OPT_OUT.search(before)
        out.append((line, match.group(1), marker.group(1).strip() if marker else None))
    return out


WITH_BLOCKS = [p for p in DOCS if python_blocks(p)]


def test_opt_outs_give_a_reason() -> None:
    for path in DOCS:
        for line, _, reason in python_blocks(path):
            assert reason is None or len(reason) > 10, f"{path.name}:{line}: an opt-out needs its reason"


def test_blocks_are_found_with_their_lines(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("text\n```python\nx = 1\n```\n<!-- not run: needs a GPU to run at all -->\n```python\ny\n```\n")
    assert python_blocks(doc) == [(2, "x = 1\n", None), (6, "y\n", "needs a GPU to run at all")]


@pytest.mark.parametrize("doc", WITH_BLOCKS, ids=[p.name for p in WITH_BLOCKS])
def test_python_blocks_run(doc: Path, quick_run: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "results").symlink_to(quick_run / "results", target_is_directory=True)
    blocks = [(f"{doc.relative_to(ROOT)}:{line}", code) for line, code, reason in python_blocks(doc) if reason is None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(blocks), cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"a Python block of {doc.name} failed:\n{proc.stderr[-4000:]}"


SIGNATURE = re.compile(r"`(\w+)\(([^`]*)\)(?: -> [^`]*)?`")


def documented_signatures(path: Path = ROOT / "docs" / "api.md") -> list[tuple[str, list[str]]]:
    """``(name, [parameter text, ...])`` for every ```name(a, b=1, *, c)``` of a public name in ``path``."""
    import tbptt_bench

    out = []
    for name, params in SIGNATURE.findall(path.read_text()):
        if name in tbptt_bench.__all__:
            out.append((name, [p.strip() for p in params.split(",") if p.strip()]))
    return out


def test_api_md_signatures_match_the_code() -> None:
    """Every parameter docs/api.md names exists under that name, with the default it states."""
    import ast
    import inspect

    import tbptt_bench

    checked = 0
    for name, params in documented_signatures():
        signature = inspect.signature(getattr(tbptt_bench, name))
        for text in params:
            if text in ("*", "...") or text.startswith("**"):
                continue
            param, _, default = text.partition("=")
            assert param in signature.parameters, f"docs/api.md: {name}() has no parameter {param!r} ({signature})"
            if default:
                actual = signature.parameters[param].default
                assert actual == ast.literal_eval(default), f"docs/api.md: {name}({param}=…) defaults to {actual!r}"
            checked += 1
    assert checked >= 30, f"only {checked} documented parameters found: the pattern no longer matches api.md"
