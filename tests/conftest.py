"""Test-wide settings: the test modules import ``reference`` from this folder; one intra-op thread;
the ``simulated_cuda`` fixture.

One thread keeps tiny-model tests fast and repeatable on a shared 2-core machine (oversubscribed
OpenMP threads slow them down 10x or more); tests that measure threading set their own count.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from cuda_sim import SimulatedCuda, install, running

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's ``tbptt-bench run quick && tbptt-bench report results/quick --out
    reports/quick`` ran, as written, once per test run, whatever the number of pytest-xdist workers
    (``results/quick`` and ``reports/quick`` in it)."""
    from readme import readme_section_commands, tbptt_bench_argv

    # pytest-xdist workers of one run share their base folder's parent: the first worker to get here runs the
    # commands under a file lock, the others wait for it and use its folder.
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    cwd, done = root / "readme_quick", root / "readme_quick.done"
    with open(root / "readme_quick.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(cwd, ignore_errors=True)
            cwd.mkdir()
            for command in readme_section_commands():
                argv = shlex.split(command)
                if argv[1] not in ("run", "report"):
                    continue
                proc = subprocess.run(tbptt_bench_argv() + argv[1:], cwd=cwd, capture_output=True, text=True,
                                      timeout=1800)
                assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
            done.touch()
    return cwd


@pytest.fixture
def simulated_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedCuda]:
    """A simulated CUDA device (tests/cuda_sim.py): ``torch.cuda`` reports one GPU whose tensors are computed
    on the CPU; its memory model and the host syncs seen are on the yielded object."""
    sim = install(monkeypatch)
    with running(sim):
        yield sim
