"""Reading the README's commands, shrinking their sizes, and starting the command line as a user would."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Flag -> the tiny value it takes in the tests (every value in a comma list is replaced one by one).
TINY = {
    "--seq-len": ["24", "32"],  # copy needs T >= 21
    "--steps": ["3"],
    "--batches": ["4"],
    "--batch": ["2"],
    "--hidden": ["8"],
    "--repeats": ["1"],
}


def readme_section_commands(heading: str = "## Quick start") -> list[str]:
    """The commands of the first ``bash`` block under ``heading``: continuations joined, comments dropped,
    ``a && b`` split into two."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line:
            commands.extend(part.strip() for part in line.split("&&"))
    return commands


def shrink(command: str) -> list[str]:
    """``command`` as argv with every size flag of :data:`TINY` at its tiny value."""
    words = shlex.split(command)
    out = []
    for i, word in enumerate(words):
        if i > 0 and words[i - 1] in TINY:
            tiny = TINY[words[i - 1]]
            word = ",".join(tiny[min(j, len(tiny) - 1)] for j in range(len(word.split(","))))
        out.append(word)
    return out


def tbptt_bench_argv() -> list[str]:
    """How to start the command line: the installed console script beside this Python, else the module."""
    script = shutil.which("tbptt-bench", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "tbptt_bench.cli"]
