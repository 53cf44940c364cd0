"""Comparing gradient estimators with each other on one trajectory (docs/design.md §7.3).

The alignment matrix holds ``cos(ĝ_i, ĝ_j)`` for every pair of methods, all computed at the same θ,
on the same batch, from the same initial state: how much two estimators agree on the direction of
descent, whether or not either is close to the true gradient.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from torch import nn

from tbptt_bench.analysis.gradients import flatten, method_gradient
from tbptt_bench.core.engine import Source
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.models.protocol import State


def alignment_matrix(
    model: nn.Module, source: Source, methods: Sequence[Method | str], loss_kind: str, state: State | None = None
) -> pd.DataFrame:
    """``cos(ĝ_i, ĝ_j)`` as a square table indexed by canonical spec (NaN where an estimate is zero)."""
    parsed = [parse_method(m) for m in methods]
    vecs = np.stack([flatten(method_gradient(model, source, m, loss_kind, state)).cpu().numpy() for m in parsed])
    norms = np.linalg.norm(vecs, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (vecs @ vecs.T) / np.outer(norms, norms)
    cos[np.outer(norms, norms) == 0] = np.nan
    specs = [m.spec for m in parsed]
    return pd.DataFrame(cos, index=specs, columns=specs)
