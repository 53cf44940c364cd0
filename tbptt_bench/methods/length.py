"""The rule for truncation lengths longer than the sequence (docs/design.md §2.10).

A truncation length ``k`` or update length ``k1`` larger than the sequence length T is accepted by
every command and by suites: windows are clipped at step 1 (§2.7). When the clipped mask keeps every
lag of every loss, the method's estimate is the full gradient, and a warning says so, so that a user
who meant a shorter K notices.
"""

from __future__ import annotations

import logging
from typing import Iterable

from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import Method, parse_method

log = logging.getLogger(__name__)

#: Parameters that are a truncation length or an update length (the rule of §2.10 is about these).
LENGTH_PARAMS = ("k", "k1")


def keeps_every_lag(updates: Iterable[Update]) -> bool:
    """Whether these updates give every loss all its lags with weight 1: the full-BPTT mask (§2.3)."""
    for u in updates:
        if u.window_start != 0 or any(f != 1.0 for _, f in u.scales):
            return False
        if u.max_lag is not None and u.max_lag < u.loss_end:
            return False
    return True


def long_window_note(method: Method | str, seq_len: int) -> str | None:
    """One line describing what ``method`` means at ``seq_len`` when a length parameter exceeds it."""
    m = parse_method(method)
    longer = [(name, m.params[name]) for name in LENGTH_PARAMS
              if isinstance(m.params.get(name), int) and m.params[name] > seq_len]
    if not longer:
        return None
    named = ", ".join(f"{name}={value}" for name, value in longer)
    note = f"{m.spec}: {named} exceeds the sequence length T={seq_len}; windows are clipped at step 1"
    if keeps_every_lag(m.updates(seq_len)):
        note += "; every loss keeps all its lags, so this is the full gradient (docs/design.md §2.10)"
    else:
        note += " (docs/design.md §2.10)"
    return note


def warn_long_windows(methods: Iterable[Method | str], seq_len: int) -> list[str]:
    """Log a warning for each method whose length parameters exceed ``seq_len``; return the notes."""
    notes = [n for n in (long_window_note(m, seq_len) for m in methods) if n]
    for note in notes:
        log.warning("%s", note)
    return notes
