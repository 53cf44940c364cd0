"""Classifying what went wrong in a measurement: out of memory, or another failure (docs/perf.md)."""

from __future__ import annotations

import torch

#: Statuses of a perf row: ``ok`` measured; ``oom`` out of memory (CPU allocator, CUDA, or the process killed by SIGKILL, as
#: the kernel's out-of-memory killer does); ``failed`` any other error; ``timeout`` a fresh process
#: that gave no result in time; ``busy`` measured, but on a busy machine and refused (``strict``).
PERF_STATUSES = ("ok", "oom", "failed", "timeout", "busy")

#: How CUDA libraries report a failed allocation of their own workspace (lower case): cuDNN and cuBLAS
#: (``CUDNN_STATUS_ALLOC_FAILED``, ``CUBLAS_STATUS_ALLOC_FAILED``, as torch raises them), cuFFT, cuSOLVER
#: and cuSPARSE, and the runtime's ``cudaErrorMemoryAllocation``.
LIBRARY_ALLOCATION_FAILURES = ("cudnn_status_alloc_failed", "cublas_status_alloc_failed", "cufft_alloc_failed",
                               "cusolver_status_alloc_failed", "cusparse_status_alloc_failed",
                               "cudaerrormemoryallocation")


def is_out_of_memory(exc: BaseException, limited: bool = False) -> bool:
    """Whether an exception says the allocator ran out of memory (CPU, CUDA, a CUDA library, or Python).

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
    if any(status in text for status in LIBRARY_ALLOCATION_FAILURES):
        return True
    return limited and ("could not execute a primitive" in text or "could not create a primitive" in text)
