"""Where a number was measured: machine, devices, software versions, threads and git commit.

Every stored result carries these columns (docs/design.md §4), so a number always says where it came from.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
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
        "numpy_version": np.__version__,
        "tbptt_bench_version": tbptt_bench.__version__,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
