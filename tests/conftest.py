"""Test-wide settings: the test modules import ``reference`` from this folder; one intra-op thread.

One thread keeps tiny-model tests fast and repeatable on a shared 2-core machine (oversubscribed
OpenMP threads slow them down 10x or more); tests that measure threading set their own count.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
