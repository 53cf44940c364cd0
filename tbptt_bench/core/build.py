"""Building the pieces of a run from plain values: task, model, device, dtype, seeds.

One place turns names (``"copy"``, ``"lstm"``, ``"float64"``, ``"auto"``) into objects, so the CLI,
suites, benchmarks and the Python API build runs the same way.
"""

from __future__ import annotations

import logging
import typing
from typing import Any

import torch
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.models import MODELS
from tbptt_bench.tasks import TASKS
from tbptt_bench.tasks.base import Task
from tbptt_bench.validation import finite_float, integer, is_allocation_failure

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Kernel settings on CUDA, applied whenever a CUDA device is resolved and recorded with every measurement
#: (provenance ``gpu_settings``). TF32 off: float32 means float32, as on the CPU and in the float64 checks
#: (TF32 rounds matmul inputs to 10 mantissa bits). cuDNN autotuning off: it picks kernels by timing them
#: on first use of each shape, so the kernel and the time could differ between runs, and tail chunks of
#: other lengths pay the search inside timed sequences. Deterministic algorithms off: slower, and the CPU
#: is the reference for exact numbers.
CUDA_SETTINGS = {"tf32": False, "cudnn_benchmark": False, "cudnn_deterministic": False}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}") from None


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (error without a GPU), ``cuda:N`` or ``auto`` (cuda if available).

    A CUDA device always comes back with its index (``cuda`` is the current device, ``cuda:0`` on a
    fresh process): ``torch.cuda``'s memory functions reject an unindexed device. Resolving one also
    applies :data:`CUDA_SETTINGS`.
    """
    if isinstance(name, torch.device) and name.type != "cuda":
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(name, torch.device) or name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"unknown device {name!r}; accepted: cpu, cuda, cuda:N, auto") from None
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            raise UsageError(f"device {name!r}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        apply_cuda_settings()
        return torch.device("cuda", index)
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {name!r}; accepted: cpu, cuda, cuda:N, auto")


def apply_cuda_settings() -> None:
    """Set TF32, cuDNN autotuning and determinism as :data:`CUDA_SETTINGS` says (process-wide)."""
    torch.backends.cuda.matmul.allow_tf32 = CUDA_SETTINGS["tf32"]
    torch.backends.cudnn.allow_tf32 = CUDA_SETTINGS["tf32"]
    torch.backends.cudnn.benchmark = CUDA_SETTINGS["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = CUDA_SETTINGS["cudnn_deterministic"]


def make_task(name: str, **params: Any) -> Task:
    """Instantiate a registered task; unknown or non-finite parameters are a UsageError."""
    cls = TASKS.get(name)
    params = check_task_params(name, cls, params)
    try:
        return cls(**params)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"task {name!r} does not accept parameters {params}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        raise UsageError(f"task {name!r} with parameters {params} does not fit in memory; use smaller values") from None


def check_task_params(name: str, cls: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Task parameters checked against the constructor's annotations: ``int`` ones are integers, ``float``
    ones finite numbers, and no number anywhere is inf or nan (docs/reliability.md)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an unresolvable annotation in a user's task: check the values alone
        hints = {}
    out = {}
    for key, value in params.items():
        what = f"task {name!r}: {key}"
        hint = hints.get(key)
        allowed = set(typing.get_args(hint)) or {hint}
        numeric_only = str not in allowed and value is not None
        if numeric_only and int in allowed and float not in allowed:
            value = integer(what, value, lo=None)
        elif numeric_only and float in allowed:
            value = finite_float(what, value)
        elif isinstance(value, float):
            value = finite_float(what, value)
        out[key] = value
    return out


def make_model(
    name: str,
    task: Task,
    hidden_size: int,
    num_layers: int = 1,
    *,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    path: str = "fused",
    model_params: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a registered model for a task with parameters drawn from ``seed``.

    The parameters are drawn in float32 under a forked RNG whatever torch's default dtype is in the
    calling process, then cast to ``dtype``: the same seed gives the same model from Python as from
    the CLI (a float64 default would otherwise draw different numbers).
    ``model_params``: extra keyword arguments of the model's factory (e.g. ``{"memory": 32}`` for ``xl``);
    one it does not accept is a UsageError.
    """
    factory = MODELS.get(name)
    if hidden_size < 1 or num_layers < 1:
        raise UsageError(f"hidden size and layers must be ≥ 1, got {hidden_size} and {num_layers}")
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"num_layers": num_layers}
        if path != "fused":
            kwargs["path"] = path
        kwargs.update(model_params or {})
        torch.set_default_dtype(torch.float32)
        try:
            model = factory(task, hidden_size, **kwargs)
        except TypeError as exc:
            raise UsageError(f"model {name!r} does not accept parameters {model_params or {}}: {exc}") from None
        finally:
            torch.set_default_dtype(default)
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
