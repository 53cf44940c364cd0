"""One validation layer for every value that enters the program (docs/reliability.md).

Pure functions with no torch import: each takes a value's name as the user wrote it (``--hidden``,
``method 'tbptt': k1``, ``suite file s.toml, [[train]] block 1: lr``), returns the value converted,
or raises :class:`~tbptt_bench.errors.UsageError` with one line saying what was wrong and what would be
right. The command line turns that into exit status 2.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

from tbptt_bench.errors import UsageError
from tbptt_bench.errors import is_allocation_failure  # noqa: F401 (re-exported: suites and core.build use it)

#: Fraction of the available memory that one run's lower-bound estimate may claim.
MEMORY_SHARE = 0.9
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def _number_text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def finite_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (open ends with ``lo_open``/``hi_open``).

    Rejects bools, inf, nan and literals such as ``1e400`` that overflow to inf.
    """
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{name} must be a number, got {_number_text(value)}") from None
    if not math.isfinite(number):
        raise UsageError(f"{name} must be a finite number, got {_number_text(value)}")
    low_bad = lo is not None and (number <= lo if lo_open else number < lo)
    high_bad = hi is not None and (number >= hi if hi_open else number > hi)
    if low_bad or high_bad:
        if lo is not None and hi is not None:
            rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rule = f"{'>' if lo_open else '≥'} {lo:g}"
        else:
            rule = f"{'<' if hi_open else '≤'} {hi:g}"
        raise UsageError(f"{name} must be {rule}, got {number:g}")
    return number


def integer(name: str, value: Any, lo: int | None = 1, hi: int | None = None) -> int:
    """``value`` as an integer in ``[lo, hi]``; integral floats (``8.0``) and digit strings are accepted.

    Rejects bools, inf, nan, ``1e400`` and non-integral floats (``2.5``).
    """
    if isinstance(value, bool):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,30}", text):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        number = int(text)
    else:
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if lo is not None and number < lo:
        raise UsageError(f"{name} must be ≥ {lo}, got {number}")
    if hi is not None and number > hi:
        raise UsageError(f"{name} must be ≤ {hi}, got {number}")
    return number


def power_of_two(name: str, value: Any, hi: int | None = None) -> int:
    """``value`` as an integer 2^j ≥ 1 (at most ``hi``): the top of a dyadic K grid 1, 2, 4, …"""
    number = integer(name, value, lo=1, hi=hi)
    if number & (number - 1):
        below = 1 << (number.bit_length() - 1)
        raise UsageError(f"{name} must be a power of two (the top of the dyadic grid 1, 2, 4, …), got {number}; "
                         f"e.g. {below} or {2 * below}")
    return number


def integer_list(name: str, text: str, lo: int = 1, example: str = "1,2,4", *, skip_empty: bool = True) -> list[int]:
    """Comma-separated integers ≥ ``lo`` (``"1,2,4"`` → ``[1, 2, 4]``); empty items are skipped unless
    ``skip_empty`` is False. A bad item is one UsageError naming it and showing ``example``."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item and skip_empty:
            continue
        try:
            out.append(integer(name, item, lo=lo))
        except UsageError:
            raise UsageError(f"{name} takes integers ≥ {lo} separated by commas, e.g. {example}; got {item!r}") from None
    return out


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    """``value`` if it is one of ``options`` (compared as written)."""
    accepted = list(options)
    if not isinstance(value, str) or value not in accepted:
        raise UsageError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    return value


def identifier(name: str, value: Any) -> str:
    """A registry name: a non-empty string of letters, digits, ``_ - .`` starting with a letter or ``_``."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise UsageError(f"{name} {value!r} must be a non-empty name of letters, digits, _ - . "
                         "starting with a letter or _ (e.g. my_task)")
    return value


def _probe_folder(folder: Path, what: str) -> None:
    """UsageError unless a file can be created (and is then removed) in ``folder``."""
    if not folder.exists():
        raise UsageError(f"cannot write {what}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise UsageError(f"cannot write {what}: {folder} is a file, not a folder; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tbptt-bench-probe.")
    except OSError as exc:
        raise UsageError(f"cannot write {what}: folder {folder} is not writable ({exc.strerror or exc}); "
                         "choose a writable folder") from None
    os.close(fd)
    os.unlink(tmp)


def writable_file(path: str | os.PathLike[str], name: str = "output") -> Path:
    """``path`` as a Path, once its folder is known to exist, be a folder and be writable, and ``path``
    itself is not a folder. Checked before any work starts, so a bad path costs nothing."""
    target = Path(path).expanduser()
    if not str(path).strip():
        raise UsageError(f"{name} path is empty; give a file name")
    if target.is_dir():
        raise UsageError(f"cannot write {name} {target}: it is a folder; give a file name")
    _probe_folder(target.parent, f"{name} {target}")
    return target


def writable_dir(path: str | os.PathLike[str], name: str = "output folder") -> Path:
    """``path`` as a Path for a folder that exists and is writable, or can be created in a writable
    parent; nothing is created here."""
    target = Path(path).expanduser()
    if not str(path).strip():
        raise UsageError(f"{name} path is empty; give a folder")
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"cannot use {name} {target}: a file stands there; give a folder")
        _probe_folder(target, f"{name} {target}")
        return target
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    _probe_folder(parent, f"{name} {target}")
    return target


def available_memory() -> int:
    """Bytes this machine can still give: ``MemAvailable`` of /proc/meminfo, else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**62


def allocation(name: str, n_elements: int, itemsize: int, limit_bytes: int | None = None) -> int:
    """The bytes of ``n_elements`` items of ``itemsize`` bytes, or a UsageError when they exceed
    ``limit_bytes`` (default: :data:`MEMORY_SHARE` of :func:`available_memory`)."""
    need = int(n_elements) * int(itemsize)
    limit = int(MEMORY_SHARE * available_memory()) if limit_bytes is None else int(limit_bytes)
    if need > limit:
        raise UsageError(f"{name} needs at least {_bytes(need)} but {_bytes(limit)} is available; "
                         "use smaller sizes")
    return need


def run_elements(batch: int, seq_len: int, hidden: int, layers: int = 1) -> int:
    """A lower bound on the tensor elements of one recurrent run: the recurrent weights of every
    layer (``layers·hidden²``) and one stored state per step and row (``batch·seq_len·hidden``), which
    every method's forward pass and the true gradient keep (docs/design.md §4)."""
    return layers * hidden * hidden + batch * seq_len * hidden + batch * seq_len


def check_run_size(batch: int, seq_len: int, hidden: int, layers: int = 1, itemsize: int = 4,
                   limit_bytes: int | None = None) -> int:
    """UsageError when even the lower bound of :func:`run_elements` does not fit in memory."""
    what = f"a run with batch {batch}, seq_len {seq_len}, hidden {hidden}, layers {layers}"
    return allocation(what, run_elements(batch, seq_len, hidden, layers), itemsize, limit_bytes)


def _bytes(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
