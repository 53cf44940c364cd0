"""The CLI starts without the heavy libraries it does not need: ``tasks``, ``explain`` and ``--help``
import neither pandas, matplotlib, seaborn, scipy nor Ray (they load only where used). Checked by
listing ``sys.modules`` in a fresh interpreter; the timing itself is a benchmark
(``benchmarks/bench_startup.py``), never a test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("pandas", "matplotlib", "seaborn", "scipy", "ray", "pyarrow")

PROBE = """
import contextlib, io, json, sys
from tbptt_bench.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main({argv!r})
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("argv", [["tasks"], ["explain", "tbptt:k1=2,k2=4", "--seq-len", "8"], ["--help"],
                                  ["bias", "--help"]])
def test_light_commands_do_not_import_heavy_libraries(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, result
