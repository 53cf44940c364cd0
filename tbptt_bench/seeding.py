"""Seeds derived from values: one rule for every random draw in the project.

A run's parameters, data and a method's own random draws each take a seed derived from the run's seed
and what the draw is for, so replicates with different seeds are independent and reruns are identical.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any values (stable across processes and Python versions)."""
    text = "\x1f".join(repr(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def method_rng(seed: int, *context: Any) -> np.random.Generator:
    """The generator a method draws its random choices from (ARTBP's cut points, docs/design.md §2.9):
    derived from the run's seed and what the draws are for, so replicates with different seeds draw
    independently and a rerun with the same seed draws the same."""
    return np.random.default_rng(derive_seed("method", seed, *context))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
