"""Errors that the command line reports as one line, each kind with its own exit status (docs/reliability.md).

* :class:`UsageError` (status 2): bad input, found before any work starts.
* :class:`ResourceError` (status 3): the system refused a resource while a command worked on a path (no
  space left, out of memory, permission refused or a read-only file system).
* :class:`Terminated` (status 143): SIGTERM, handled as an interruption like SIGINT (status 130).
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

#: Exit statuses of the command line (docs/reliability.md).
EXIT_FAILED_CELLS = 1
EXIT_USAGE = 2
EXIT_RESOURCE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: errno → (what ran out or was refused, what to do about it).
_SPACE = "free some space there (or write elsewhere) and run the command again"
_ACCESS = "make it writable (or write elsewhere) and run the command again"
RESOURCE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EFBIG: ("file too large for the file system", _SPACE),
    errno.ENOMEM: ("out of memory", "free memory or use smaller sizes"),
    errno.EACCES: ("permission denied", _ACCESS),
    errno.EPERM: ("operation not permitted", _ACCESS),
    errno.EROFS: ("read-only file system", _ACCESS),
}
_MEMORY_WORDS = ("can't allocate memory", "out of memory", "not enough memory")


class UsageError(ValueError):
    """Bad input from the user: an unknown name, a malformed spec, a missing or corrupt file.

    The message must say what was wrong and what is accepted; the CLI prints it without a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, a container stop): raised in the main thread like SIGINT's
    KeyboardInterrupt, so that every ``finally`` and ``except BaseException`` clean-up runs on the way out."""


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says memory could not be allocated (MemoryError, or torch's allocator error)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in _MEMORY_WORDS)


def resource_cause(exc: BaseException) -> BaseException | None:
    """The out-of-space, out-of-memory or permission error in ``exc`` or the exceptions it was raised
    from or while handling (a library may turn a failed write into another error, as matplotlib's PDF
    writer does when it closes a file that could not be written); None when there is none."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in RESOURCE_ERRNOS:
            return current
        if is_allocation_failure(current):
            return current
        context = None if current.__suppress_context__ else current.__context__
        stack.extend(e for e in (context, current.__cause__) if e is not None)
    return None


def _cause_words(cause: BaseException, action: str) -> tuple[str, str]:
    """(what ran out or was refused, with the errno's name; what to do)."""
    if isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS:
        what, hint = RESOURCE_ERRNOS[cause.errno]
        if hint == _ACCESS and action == "read":
            hint = "make it readable and run the command again"
        return f"{what} ({errno.errorcode.get(cause.errno, cause.errno)})", hint
    detail = " ".join(str(cause).split())[:160]
    return f"out of memory ({detail})" if detail else "out of memory", "free memory or use smaller sizes"


class ResourceError(Exception):
    """The system refused a resource while a command read or wrote ``path`` (exit status 3).

    ``note`` is what the command adds about its state (e.g. which cells are kept); the message is one line.
    """

    def __init__(self, path: str | os.PathLike[str] | None, cause: BaseException, action: str = "write",
                 note: str = "") -> None:
        self.path, self.cause, self.action, self.note = path, cause, action, note
        super().__init__(self.message())

    def message(self) -> str:
        """``cannot ACTION PATH: CAUSE; NOTE; WHAT TO DO`` (``out of memory (...) while ...`` for memory)."""
        what, hint = _cause_words(self.cause, self.action)
        if self.path is None:
            head = what
        elif isinstance(self.cause, OSError) and self.cause.errno != errno.ENOMEM:
            head = f"cannot {self.action} {self.path}: {what}"
        else:
            head = f"{what} while trying to {self.action} {self.path}"
        return "; ".join(filter(None, (head, self.note, hint)))

    def __str__(self) -> str:
        return self.message()


@contextlib.contextmanager
def touching(path: str | os.PathLike[str], action: str = "write", note: str = "") -> Iterator[None]:
    """Turn an out-of-space, out-of-memory or permission error raised inside into a :class:`ResourceError`
    naming ``path`` (with ``note`` on what was kept); a ResourceError raised deeper (naming a more precise
    path) passes unchanged."""
    try:
        yield
    except (ResourceError, UsageError):
        raise
    except Exception as exc:
        cause = resource_cause(exc)
        if cause is None:
            raise
        raise ResourceError(path, cause, action, note) from exc
