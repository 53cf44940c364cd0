"""Cost of an update on the CPU: time and peak memory of one sequence of each method family's updates.

The cell (model, data, engine, optimiser) is built in ``setup``, outside the measurement; the measured
call is one ``Engine.run`` over the cell's sequence with an optimiser step after every update. Torch
runs on one thread (:data:`asv_bench.grid.THREADS`) so that timings taken on shared CI machines compare.
"""

from __future__ import annotations

from asv_bench import grid


class CPUUpdate:
    """time_ and peakmem_ of one sequence of updates, per (task, method family)."""

    params = grid.grid()
    param_names = grid.PARAM_NAMES

    def setup(self, task: str, method: str) -> None:
        self.trainer = grid.build(task, method).trainer()
        self.trainer.run()

    def time_update(self, task: str, method: str) -> None:
        """Seconds for one sequence of updates (forward, backward, clip, optimiser step)."""
        self.trainer.run()

    def peakmem_update(self, task: str, method: str) -> None:
        """Peak resident memory of the process around one sequence of updates (bytes)."""
        self.trainer.run()
