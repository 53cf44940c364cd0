"""Seeds derived from values: one rule for every random draw in the project.

A run's parameters, data and a method's own random draws each take a seed derived from the run's seed
and what the draw is for, so replicates with different seeds are independent and reruns are identical.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any values (stable across processes and Python versions)."""
    text = "\x1f".join(repr(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
