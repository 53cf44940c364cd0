"""The public API's own functions: describe a method, draw a batch as the CLI does, a bias curve.

Everything here is re-exported by ``tbptt_bench`` (``from tbptt_bench import explain_method``); the
rest of the public surface is re-exported from where it lives. Reference: docs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.build import make_task
from tbptt_bench.core.mask import explain, mask_matrix, render_mask
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.tasks.base import Batch, Task

if TYPE_CHECKING:
    import pandas as pd

#: Longest T for which :func:`explain_method` prints a table (as ``tbptt-bench explain``).
MAX_EXPLAIN_LENGTH = 2000


def method_mask(method: str | Method, seq_len: int) -> np.ndarray:
    """The ``T × T`` mask ``m(t, s)`` of a method (row: loss t, column: step s; 0-based; docs/design.md §2.3).

    >>> method_mask("chunked:k=2", 3).tolist()
    [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if seq_len < 1:
        raise UsageError(f"seq_len must be ≥ 1, got {seq_len}")
    return mask_matrix(parse_method(method).updates(seq_len), seq_len)


def explain_method(method: str | Method, seq_len: int, *, picture: bool = False) -> str:
    """What ``tbptt-bench explain`` prints: each loss's update and the lags it receives, and (with
    ``picture``) the mask drawn row by row ('#' kept, '.' dropped, '~' reweighted).

    >>> print(explain_method("tbptt:k1=3,k2=5", 8).splitlines()[6])  # loss 5 keeps lags 0-3
        5       2        6  0-3
    """
    if not 1 <= seq_len <= MAX_EXPLAIN_LENGTH:
        raise UsageError(f"seq_len must be between 1 and {MAX_EXPLAIN_LENGTH} to print a mask, got {seq_len}")
    m = parse_method(method)
    updates = m.updates(seq_len)
    lines = [f"{m.spec} over T = {seq_len}: {len(updates)} update(s); steps and updates are 1-based",
             explain(updates, seq_len)]
    if picture:
        lines += ["", "mask (row: loss t, column: step s = 1..t; '#' kept, '.' dropped, '~' reweighted):",
                  render_mask(updates, seq_len)]
    return "\n".join(lines)


def sample_batch(task: str | Task, batch_size: int, seq_len: int, seed: int = 0, split: str = "train") -> Batch:
    """A batch drawn by the CLI's seed rule (``tbptt-bench grad --seed``): the same data for the same seed."""
    task = make_task(task) if isinstance(task, str) else task
    if batch_size < 1 or seq_len < 1:
        raise UsageError(f"batch_size and seq_len must be ≥ 1, got {batch_size} and {seq_len}")
    return task.sample(batch_size, seq_len, generator(derive_seed("data", seed)), split)


def bias_curve(
    model: nn.Module,
    task: str | Task,
    methods: Sequence[str | Method],
    *,
    seq_len: int,
    batch_size: int = 8,
    n_batches: int = 8,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    group: str | None = "all",
    **options: Any,
) -> "pd.DataFrame":
    """Bias of each method against the true gradient for any protocol model (docs/design.md §3).

    One row per method (and per parameter group when ``group`` is None): ``relative_bias`` with its
    interval, cosine, relative error, variance and the Aicher et al. bound. A thin wrapper of
    :func:`tbptt_bench.analysis.bias.measure_bias`; ``options`` go to it (e.g. ``n_flips``, ``probes``).

    >>> curve = bias_curve(model, "copy", [f"chunked:k={k}" for k in (1, 2, 4, 8)], seq_len=32)  # doctest: +SKIP
    """
    from tbptt_bench.analysis.bias import measure_bias  # heavy, and refactored on its own

    task = make_task(task) if isinstance(task, str) else task
    specs = [parse_method(m) for m in methods]
    options.setdefault("with_provenance", False)
    table = measure_bias(task, model, specs, seq_len=seq_len, batch_size=batch_size, n_batches=n_batches,
                         seed=seed, dtype=dtype, **options)
    if group is None:
        return table
    return table[table["group"] == group].reset_index(drop=True)
