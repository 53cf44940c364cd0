"""Memory of the measuring process: resident-set high-water marks, glibc heap modes, CUDA peaks, limits.

**Peak memory** (``mem_*`` columns, bytes). ``mem_delta_bytes`` is the peak over the whole run
(warm-up and timed sequences) above a baseline taken after the model, the optimiser and the batch
exist: what training adds, optimiser state included. ``mem_sequence_bytes`` is the peak of one more
sequence above the memory in use just before it: what one sequence of updates needs (activations,
gradients, workspaces), the number that scales with the method. On CPU both are resident-set
high-water marks (Linux ``VmHWM``, reset with ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``: KiB
on Linux, bytes on macOS) minus the resident set at the baseline, less the growth of file-backed pages
(library code paged in when a kernel first runs is not memory the run allocates). In a fresh process
(:func:`tbptt_bench.perf.child.measure_in_fresh_process`) the sequence pass first makes glibc serve large allocations by
``mmap``, so freed tensors leave the resident set and the high-water mark follows live memory rather
than the heap's history; only a fresh process per configuration makes the CPU numbers independent of
what ran before. On CUDA the numbers come from the caching allocator: ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus the allocation at the baseline, with ``max_memory_reserved`` beside.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
from typing import Any, Callable

import torch

from tbptt_bench.errors import UsageError

def maxrss_bytes(raw: int, system: str | None = None) -> int:
    """``ru_maxrss`` in bytes: the kernel reports KiB on Linux (and BSDs), bytes on macOS."""
    system = platform.system() if system is None else system
    return int(raw) if system == "Darwin" else int(raw) * 1024


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (since start, or since the last reset), bytes.

    Linux: ``VmHWM``, the mark :func:`reset_peak_rss` resets (``ru_maxrss`` also keeps the peak of
    exited threads, which a reset does not clear). Elsewhere: ``ru_maxrss``.
    """
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # the file says "kB" and means KiB
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """The resident set now (Linux ``VmRSS``), or None where the system does not say."""
    return proc_status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set (Linux ≥ 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``), so a baseline is not inflated."""
    gc.collect()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _mallopt(param: int, value: int) -> bool:
    if platform.system() != "Linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def set_heap_mode(exact: bool) -> bool:
    """Choose how glibc serves large allocations for the rest of this process (False: not glibc).

    ``exact``: every allocation of 64 KiB or more by its own ``mmap``, so freeing a tensor shrinks the
    resident set at once and the high-water mark follows live memory, not the heap's history (large
    allocations get slower: for memory passes). Otherwise: up to 32 MiB from the heap, trimmed above
    64 MiB free — the state glibc's adaptive threshold settles in once it has warmed up (for timing).
    Either setting ends the adaptive threshold, so only fresh measuring processes call this.
    """
    if exact:
        return _mallopt(_M_MMAP_THRESHOLD, 64 * 2**10)
    return _mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) and _mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


class MemoryProbe:
    """Peak memory above baselines (bytes): over the whole run, and over one sequence from rest.

    :meth:`start` takes the baseline before the first sequence (model, optimiser and batch exist);
    :meth:`run_peak` reads the peak since then, the sequences measured by :meth:`sequence_peak`
    included. :meth:`sequence_peak` measures one more sequence from a fresh baseline: the extra memory
    one sequence of updates needs once optimiser state and one-time workspaces exist (activations,
    gradients, workspaces). Its reset of the high-water mark does not lose the run's peak before it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.file_baseline = 0
        self.source = ""
        self.earlier_peak = 0  # the run's peaks before the last reset by sequence_peak
        self.earlier_reserved = 0

    def _file_backed(self) -> int:
        """Resident pages of mapped files (library code paged in as new kernels first run), or 0.

        They are not memory the run allocates; their growth is taken off the high-water mark.
        """
        if self.device.type == "cuda":
            return 0
        return proc_status_bytes("RssFile") or 0

    def _now(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def _peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def _reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_rss()

    def start(self) -> None:
        release_free_memory()
        self.file_baseline = self._file_backed()
        now = self._now()
        if now is not None and self._reset():
            self.baseline = now
            self.source = "cuda_allocator" if self.device.type == "cuda" else "rss_hwm_reset"
        else:  # no reset: the lifetime high-water mark, meaningful in a fresh process only
            self.baseline, self.source = (now if now is not None else peak_rss_bytes()), "ru_maxrss"

    def run_peak(self) -> dict[str, Any]:
        peak = max(self._peak(), self.earlier_peak)
        reserved = None
        if self.device.type == "cuda":
            reserved = max(torch.cuda.max_memory_reserved(self.device), self.earlier_reserved)
        paged_in = max(self._file_backed() - self.file_baseline, 0)
        return {"mem_baseline_bytes": int(self.baseline), "mem_peak_bytes": int(peak),
                "mem_delta_bytes": int(max(peak - self.baseline - paged_in, 0)), "mem_reserved_peak_bytes": reserved,
                "mem_source": self.source}

    def sequence_peak(self, run: Callable[[], None]) -> int | None:
        """Peak above the memory in use just before ``run()`` (None where the peak cannot be reset)."""
        if self.source == "ru_maxrss":
            run()
            return None
        release_free_memory()
        file_before = self._file_backed()
        before = self._now()
        self.earlier_peak = max(self.earlier_peak, self._peak())
        if self.device.type == "cuda":
            self.earlier_reserved = max(self.earlier_reserved, torch.cuda.max_memory_reserved(self.device))
        self._reset()
        run()
        paged_in = max(self._file_backed() - file_before, 0)
        return None if before is None else int(max(self._peak() - before - paged_in, 0))


def limit_cuda_memory(device: torch.device, limit: int) -> None:
    """Let the caching allocator reserve at most ``limit`` bytes more than it holds now.

    The allocator applies its fraction to *reserved* memory (cached blocks included), so the cache is
    emptied first and the limit counted from what stays reserved: what the run may add does not depend on
    how much an earlier pass left cached.
    """
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(device) + limit) / total), device)


def limit_address_space(limit: int) -> Callable[[], None]:
    """A callable that caps this process's address space at its current size plus ``limit`` bytes."""

    def apply() -> None:
        size = proc_status_bytes("VmSize")
        if size is None:
            raise UsageError("perf: memory_limit on the CPU needs Linux (/proc/self/status)")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = size + limit if hard == resource.RLIM_INFINITY else min(size + limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return apply
