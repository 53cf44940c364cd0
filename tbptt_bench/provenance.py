"""Where a number was measured: machine, devices, software versions, threads and git commit.

Every stored result carries these columns (docs/design.md §4), so a number always says where it came from.
:class:`LoadProbe` adds how busy the machine was while a time was taken (docs/perf.md, "Busy machine").
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tbptt_bench


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source tree the package runs from (``+dirty`` if modified), or ``unknown``."""
    root = Path(tbptt_bench.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TBPTT_BENCH_COMMIT", "unknown")


def gpu_model(device: torch.device | str | None = None) -> str:
    """The CUDA device's name, or ``""`` when the measurement did not use a GPU."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(dev)


def gpu_settings() -> str:
    """TF32, cuDNN autotuning and determinism as in force now (``tbptt_bench.core.build.CUDA_SETTINGS`` sets them)."""
    b = torch.backends
    return (f"tf32_matmul={int(b.cuda.matmul.allow_tf32)} tf32_cudnn={int(b.cudnn.allow_tf32)} "
            f"cudnn_benchmark={int(b.cudnn.benchmark)} cudnn_deterministic={int(b.cudnn.deterministic)}")


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """Columns that say where and with what a measurement was taken."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "device": dev.type,
        "cpu_model": cpu_model(),
        "gpu_model": gpu_model(dev),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "cudnn_version": str(torch.backends.cudnn.version() or "") if dev.type == "cuda" else "",
        "gpu_settings": gpu_settings() if dev.type == "cuda" else "",
        "numpy_version": np.__version__,
        "tbptt_bench_version": tbptt_bench.__version__,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }


#: Other processes using more than this many cores' worth of CPU during a measurement make it busy.
BUSY_OTHER_CORES = 0.25
#: Without CPU counters (or for a window too short to resolve): busy when the 1-minute load average
#: exceeds the threads the measurement uses plus this.
BUSY_LOAD_MARGIN = 0.5
#: The busy-jiffy counters of /proc/stat: user, nice, system, irq, softirq, steal (guest time is
#: already inside user; idle and iowait are not busy).
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def _allowed_cpus() -> set[int] | None:
    getter = getattr(os, "sched_getaffinity", None)
    return set(getter(0)) if callable(getter) else None


def cpu_busy_seconds(cpus: set[int] | None = None, stat_text: str | None = None) -> float | None:
    """CPU seconds all processes have spent busy on ``cpus`` (all CPUs if None) since boot.

    Linux: the per-CPU lines of ``/proc/stat`` (ticks of ``SC_CLK_TCK``); elsewhere ``psutil`` if it is
    installed; None when neither is available. ``stat_text`` replaces the file (for tests).
    """
    if stat_text is None:
        try:
            stat_text = Path("/proc/stat").read_text()
        except OSError:
            return _psutil_busy_seconds(cpus)
    ticks, seen = 0, False
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        values = [int(v) for v in rest.split()]
        ticks += sum(values[i] for i in _BUSY_FIELDS if i < len(values))
        seen = True
    return ticks * clock_tick_seconds() if seen else None


def clock_tick_seconds() -> float:
    """Seconds per tick of the kernel's CPU-time counters (``SC_CLK_TCK``; 0.01 where unknown)."""
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 0.01


def _psutil_busy_seconds(cpus: set[int] | None) -> float | None:
    try:
        import psutil  # type: ignore[import-not-found]  # optional: only where /proc/stat is missing
    except ImportError:
        return None
    total = 0.0
    for i, t in enumerate(psutil.cpu_times(percpu=True)):
        if cpus is None or i in cpus:
            total += sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    return total


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its waited-for children, user plus system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_average_1m() -> float | None:
    """The 1-minute load average (runnable processes), or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def judge_busy(other_cores: float | None, resolution_cores: float, load_avg: float | None, threads: int) -> bool | None:
    """Whether a measurement ran on a busy machine (docs/perf.md, "Busy machine").

    Busy when other processes used more than :data:`BUSY_OTHER_CORES` cores beyond the counters'
    resolution; where that cannot be told (no counters, or a window shorter than the resolution
    allows), when the load average exceeds ``threads`` + :data:`BUSY_LOAD_MARGIN`; None if neither is known.
    """
    if other_cores is not None and resolution_cores < BUSY_OTHER_CORES:
        return other_cores - resolution_cores > BUSY_OTHER_CORES
    if load_avg is not None:
        return load_avg > threads + BUSY_LOAD_MARGIN
    return None


class LoadProbe:
    """How busy the machine was between :meth:`start` and :meth:`stop`, as result columns.

    Other processes' CPU time is the busy time of the CPUs this process may run on minus this
    process's own (threads and waited-for children), over the wall time: ``other_cpu_fraction`` is in
    cores (0.5 = half of one core's time, 2.0 = two cores fully).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.cpus = _allowed_cpus()
        self._start: tuple[float, float | None, float, float | None] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), cpu_busy_seconds(self.cpus), own_cpu_seconds(), load_average_1m())

    def stop(self) -> dict[str, Any]:
        """Columns ``load_avg_1m`` (at start), ``load_avg_1m_end``, ``other_cpu_fraction``, ``busy``."""
        if self._start is None:
            raise RuntimeError("LoadProbe.stop() before start()")
        t0, busy0, own0, load0 = self._start
        wall = max(time.perf_counter() - t0, 1e-9)
        busy1, own1, load1 = cpu_busy_seconds(self.cpus), own_cpu_seconds(), load_average_1m()
        other = None if busy0 is None or busy1 is None else max(busy1 - busy0 - (own1 - own0), 0.0) / wall
        n_cpus = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        # each CPU counter and the own time may each be off by one tick at either end
        resolution = (2 * n_cpus + 2) * clock_tick_seconds() / wall if other is not None else float("inf")
        loads = [v for v in (load0, load1) if v is not None]
        return {
            "load_avg_1m": load0, "load_avg_1m_end": load1, "other_cpu_fraction": other,
            "busy": judge_busy(other, resolution, max(loads) if loads else None, self.threads),
        }
