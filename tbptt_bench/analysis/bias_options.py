"""What a bias measurement averages over and how: :class:`BiasOptions`, each option declared once.

Kept apart from :mod:`tbptt_bench.analysis.bias` so that the command line builds ``bias``'s flags from
these declarations without loading pandas or scipy. The ``bias`` command and a suite's ``[[bias]]`` keys
derive from them (:func:`tbptt_bench.suites.measures.bias_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import Method
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.options import MAX_COUNT, option

#: Random sign patterns of the test of zero bias, declared here for the command line and the statistics
#: (:data:`tbptt_bench.analysis.expectation.DEFAULT_FLIPS` is this value).
FLIPS = 999


def default_max_lag(seq_len: int, methods: Sequence[Method]) -> int:
    """Lags profiled when not given: every method's fixed lag count, and at least min(T - 1, 64)."""
    fixed = [m.fixed_lags for m in methods if m.fixed_lags is not None]
    return max(1, min(seq_len, max([min(seq_len - 1, 64), *fixed])))


#: ``BiasOptions.expectation``: E ĝ over random draws only as sampled, or also exactly.
EXPECTATIONS = ("sampled", "exact")


@dataclass(frozen=True)
class BiasOptions:
    """What a bias measurement averages over and how (see :func:`analyse_bias`).

    ``dtype`` (e.g. float64) computes everything on a copy of the model in that dtype. ``max_lag``: lags of
    the profile (0: none; None: :func:`default_max_lag`); the profile pools the first ``profile_batches``.
    ``labels``: extra constant columns (e.g. ``{"model": "lstm", "hidden": 64}``). ``probes > 0``: g enters
    only through that many forward-mode directional derivatives per batch (:mod:`tbptt_bench.analysis.truegrad`).
    ``expectation="exact"`` also computes each random method's E ĝ over its draws exactly at every batch
    (the ``exact_*`` columns; ``"sampled"``: only deterministic methods have them).
    """

    seq_len: int
    batch_size: int
    n_batches: int = option(dataclasses.MISSING, flag="--batches", lo=1, hi=MAX_COUNT,
                            help="independent batches (stream positions) N")
    seed: int
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    true_checkpoint: int | None = option(None, flag="--true-checkpoint", metavar="C", lo=1, hi=MAX_COUNT,
                                         help="true gradient with activation checkpointing every C steps (memory "
                                              "~T/C + C)")
    n_flips: int = option(FLIPS, flag="--flips", lo=0, hi=MAX_COUNT,
                          help="random sign flips for the test of zero bias (0: skip the test)")
    ci_level: float = option(0.95, flag="--ci", lo=0, hi=1, lo_open=True, hi_open=True, help="confidence level")
    split: str = option("valid", flag="--split", choices=("train", "valid", "test"), help="data split")
    warmup: int | None = option(None, flag="--warmup", lo=0, hi=MAX_COUNT,
                                help="streaming tasks: warm-up steps before each segment (default T; 0: zero state)")
    max_lag: int | None = option(None, flag="--max-lag", metavar="D", lo=0, hi=MAX_COUNT,
                                 help="lags of the lag profile (default min(T-1, 64) and every sliding K; 0: none)")
    profile_batches: int = option(1, flag="--profile-batches", lo=0, hi=MAX_COUNT,
                                  help="batches pooled into the lag profile")
    fit_from: int = option(1, flag="--fit-from", lo=1, hi=MAX_COUNT, help="first lag of the geometric decay fit")
    fast: bool = option(True, flag="--engine", action="store_false",
                        help="compute every method through the engine (no shared K curve or lag decomposition)")
    with_provenance: bool = True
    labels: dict[str, Any] | None = None
    probes: int = option(0, flag="--probes", metavar="N", lo=0, hi=MAX_COUNT,
                         help="no true gradient: compare through N forward-mode probes per batch (memory independent "
                              "of T; group 'all' only)")
    expectation: str = option("sampled", flag="--expectation", choices=EXPECTATIONS,
                              help="exact: also compute E ĝ over a random method's draws exactly at every batch (no "
                                   "sampling; JSON field 'exact'); sampled: only deterministic methods get the exact_* "
                                   "figures")

    @classmethod
    def of(cls, options: BiasOptions | None, fields: dict[str, Any]) -> BiasOptions:
        """``options`` with ``fields`` replaced, or options made from ``fields``; UsageError for unknown names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UsageError(f"unknown bias option {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        if options is not None:
            return dataclasses.replace(options, **fields)
        missing = [n for n in ("seq_len", "batch_size", "n_batches", "seed") if n not in fields]
        if missing:
            raise UsageError(f"a bias measurement needs {', '.join(missing)}; e.g. seq_len=64, batch_size=16, "
                             "n_batches=8, seed=0")
        return cls(**fields)

    def check(self, methods: Sequence[Method]) -> int:
        """Raise UsageError for options that cannot be measured; return the profile's maximum lag."""
        if not methods:
            raise UsageError("no methods to measure; give at least one method spec")
        if self.n_batches < 1:
            raise UsageError(f"the number of batches must be ≥ 1, got {self.n_batches}")
        if self.seq_len < 1:
            raise UsageError(f"seq_len must be ≥ 1, got {self.seq_len}")
        warn_long_windows(methods, self.seq_len)  # K > T: windows clipped at step 1 (docs/design.md §2.10)
        if self.true_checkpoint is not None and self.true_checkpoint < 1:
            raise UsageError(f"the checkpoint length must be ≥ 1, got {self.true_checkpoint}")
        if not 0 < self.ci_level < 1:
            raise UsageError(f"the confidence level must be in (0, 1), got {self.ci_level}")
        if self.expectation not in EXPECTATIONS:
            raise UsageError(f"expectation must be one of {', '.join(EXPECTATIONS)}, got {self.expectation!r}")
        if self.expectation == "exact" and self.probes:
            raise UsageError("the exact expectation is compared with the true gradient; use probes=0 with it")
        if self.probes < 0 or self.probes == 1:
            raise UsageError(f"the number of probes must be 0 (exact true gradient) or ≥ 2, got {self.probes}")
        lag_max = default_max_lag(self.seq_len, methods) if self.max_lag is None else self.max_lag
        if lag_max < 0 or lag_max > self.seq_len:
            raise UsageError(f"the maximum lag D must be between 0 and the sequence length T={self.seq_len}, "
                             f"got {lag_max}")
        return lag_max


@dataclass(frozen=True)
class SnapshotOptions:
    """Bias snapshots taken while training (``train --bias-at``; :func:`tbptt_bench.analysis.bias.bias_snapshots`)."""

    n_batches: int = option(4, flag="--bias-batches", lo=1, hi=MAX_COUNT, help="held-out batches per bias snapshot")
