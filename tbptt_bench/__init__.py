"""tbptt-bench: gradient bias, cost and learning outcomes of truncated BPTT.

The public API (reference: docs/api.md). ``import tbptt_bench`` is light: each name is imported from
its module on first use.

>>> from tbptt_bench import parse_method, explain_method
>>> parse_method("chunked:k=4").spec
'chunked:k=4'

Describe a method: :func:`parse_method`, :func:`explain_method`, :func:`method_mask`.
Gradients at a fixed θ: :func:`method_gradient`, :func:`true_gradient`, :func:`compare`.
Bias over K for any model: :func:`bias_curve` (and :func:`analyse_bias`, :func:`measure_bias`).
Long horizons: :func:`kcurve_gradients`, :func:`streamed_chunked_curve`, :func:`long_lag_profile`.
Your own training loop: :class:`TBPTT`, :func:`wrap_rnn`; Lightning 2: ``tbptt_bench.lightning``.
Build what the CLI builds: :func:`make_task`, :func:`make_model`, :func:`sample_batch`.
Extend: :func:`register_task`, :func:`register_model`, :func:`register_method` (with :class:`Task`,
:class:`Method`, :class:`Param`, :class:`Update`, :class:`Batch`). Results: :func:`read_results`,
:func:`table_names`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the module it lives in (imported on first use).
_EXPORTS: dict[str, str] = {
    "UsageError": "tbptt_bench.errors",
    "parse_method": "tbptt_bench.methods.base",
    "Method": "tbptt_bench.methods.base",
    "Param": "tbptt_bench.methods.base",
    "register_method": "tbptt_bench.methods.base",
    "Update": "tbptt_bench.core.mask",
    "explain_method": "tbptt_bench.api",
    "method_mask": "tbptt_bench.api",
    "sample_batch": "tbptt_bench.api",
    "bias_curve": "tbptt_bench.api",
    "method_gradient": "tbptt_bench.analysis.gradients",
    "true_gradient": "tbptt_bench.analysis.gradients",
    "compare": "tbptt_bench.analysis.gradients",
    "analyse_bias": "tbptt_bench.analysis.bias",
    "measure_bias": "tbptt_bench.analysis.bias",
    "kcurve_gradients": "tbptt_bench.analysis.kcurve",
    "streamed_chunked_curve": "tbptt_bench.analysis.kcurve",
    "long_lag_profile": "tbptt_bench.analysis.long_lags",
    "TBPTT": "tbptt_bench.loop",
    "Step": "tbptt_bench.loop",
    "wrap_rnn": "tbptt_bench.loop",
    "autocast_supported": "tbptt_bench.loop",
    "Task": "tbptt_bench.tasks.base",
    "Batch": "tbptt_bench.tasks.base",
    "register_task": "tbptt_bench.tasks",
    "register_model": "tbptt_bench.models",
    "make_task": "tbptt_bench.core.build",
    "make_model": "tbptt_bench.core.build",
    "read_results": "tbptt_bench.suites.store",
    "table_names": "tbptt_bench.suites.store",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (keeps ``import tbptt_bench`` light)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tbptt_bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from tbptt_bench.analysis.bias import analyse_bias, measure_bias
    from tbptt_bench.analysis.gradients import compare, method_gradient, true_gradient
    from tbptt_bench.analysis.kcurve import kcurve_gradients, streamed_chunked_curve
    from tbptt_bench.analysis.long_lags import long_lag_profile
    from tbptt_bench.api import bias_curve, explain_method, method_mask, sample_batch
    from tbptt_bench.core.build import make_model, make_task
    from tbptt_bench.core.mask import Update
    from tbptt_bench.errors import UsageError
    from tbptt_bench.loop import TBPTT, Step, autocast_supported, wrap_rnn
    from tbptt_bench.methods.base import Method, Param, parse_method, register_method
    from tbptt_bench.models import register_model
    from tbptt_bench.suites.store import read_results, table_names
    from tbptt_bench.tasks import register_task
    from tbptt_bench.tasks.base import Batch, Task
