"""Test-wide settings: the test modules import ``reference`` from this folder; one intra-op thread;
the ``simulated_cuda`` fixture.

One thread keeps tiny-model tests fast and repeatable on a shared 2-core machine (oversubscribed
OpenMP threads slow them down 10x or more); tests that measure threading set their own count.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from cuda_sim import SimulatedCuda, install, running

torch.set_num_threads(1)


@pytest.fixture
def simulated_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedCuda]:
    """A simulated CUDA device (tests/cuda_sim.py): ``torch.cuda`` reports one GPU whose tensors are computed
    on the CPU; its memory model and the host syncs seen are on the yielded object."""
    sim = install(monkeypatch)
    with running(sim):
        yield sim
