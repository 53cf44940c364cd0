"""Classifying what went wrong in a measurement: out of memory, or another failure (docs/perf.md)."""

from __future__ import annotations

import torch

#: Statuses of a perf row: ``ok`` measured; ``oom`` out of memory (CPU allocator, CUDA, or the process killed by SIGKILL, as
#: the kernel's out-of-memory killer does); ``failed`` any other error; ``timeout`` a fresh process
#: that gave no result in time; ``busy`` measured, but on a busy machine and refused (``strict``).
PERF_STATUSES = ("ok", "oom", "failed", "timeout", "busy")


def is_out_of_memory(exc: BaseException, limited: bool = False) -> bool:
    """Whether an exception says the allocator ran out of memory (CPU, CUDA or Python).

    ``limited``: a memory limit is in force; oneDNN then reports a failed workspace allocation only
    as a primitive it could not create or execute, which counts as out of memory too.
    """
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    if not isinstance(exc, RuntimeError):
        return False
    if "out of memory" in text or "can't allocate memory" in text:
        return True
    return limited and ("could not execute a primitive" in text or "could not create a primitive" in text)
