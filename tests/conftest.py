"""Test-wide settings: the test modules import ``reference`` from this folder; one intra-op thread;
the ``simulated_cuda`` fixture.

One thread keeps tiny-model tests fast and repeatable on a shared 2-core machine (oversubscribed
OpenMP threads slow them down 10x or more); tests that measure threading set their own count.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from cuda_sim import SimulatedCuda, install, running

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the ``quick_run`` folder share one pytest-xdist worker (``--dist loadgroup``), so the
    README's quick suite runs once per test run, not once per worker."""
    for item in items:
        if "quick_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("quick_run"))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's ``tbptt-bench run quick && tbptt-bench report results/quick --out
    reports/quick`` ran, as written, once per test session (``results/quick`` and ``reports/quick`` in it)."""
    from readme import readme_section_commands, tbptt_bench_argv

    cwd = tmp_path_factory.mktemp("readme_quick")
    for command in readme_section_commands():
        argv = shlex.split(command)
        if argv[1] not in ("run", "report"):
            continue
        proc = subprocess.run(tbptt_bench_argv() + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return cwd


@pytest.fixture
def simulated_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedCuda]:
    """A simulated CUDA device (tests/cuda_sim.py): ``torch.cuda`` reports one GPU whose tensors are computed
    on the CPU; its memory model and the host syncs seen are on the yielded object."""
    sim = install(monkeypatch)
    with running(sim):
        yield sim
