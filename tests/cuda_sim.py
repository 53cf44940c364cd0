"""A simulated CUDA device for machines without one: torch.cuda's own Python functions over a fake backend.

What is faked is the layer under ``torch.cuda``: the ``torch._C._cuda_*`` entry points (device count,
current device, synchronize, memory statistics, memory fraction, cache, sync debug mode) and the device
properties. ``torch.cuda``'s Python functions run unchanged, so their argument checks stay torch's own:
``set_per_process_memory_fraction(1.0, torch.device("cuda"))`` raises exactly as on a GPU machine.

Tensors are computed on the CPU. A :class:`~torch.overrides.TorchFunctionMode` moves every tensor asked
for on ``cuda`` to the CPU and marks it as a device tensor; a result computed from a device tensor is
one too, and a device tensor reports ``device == cuda:0`` and ``is_cuda``. Device tensors are counted by
a caching-allocator model (:class:`Allocator`): allocated bytes, 2 MiB-rounded reserved segments, peaks,
``empty_cache`` and the per-process fraction, which — as in torch's allocator — bounds *reserved* memory
and raises ``torch.OutOfMemoryError`` when a new segment would pass it. Only tensors that Python sees
are counted (autograd's saved buffers and kernel workspaces are not), so the figures are lower bounds.

Every operation that makes the host wait for a real device is recorded in :attr:`SimulatedCuda.syncs`:
``torch.cuda.synchronize``, reading a device tensor's value on the host (``item``, ``tolist``,
``numpy``, ``bool``/``int``/``float``, copies to the CPU), data-dependent shapes (``nonzero``,
``masked_select``, ``unique``), and host-to-device copies from pageable (not pinned) memory. With
``torch.cuda.set_sync_debug_mode("error")`` such an operation raises, as torch does on a GPU.

Forward-mode derivatives (``torch.func.jvp``) through a fused RNN call on the device raise as cuDNN's
kernel does while cuDNN is enabled; with it off they run, or raise too where
:attr:`SimulatedCuda.native_rnn_forward_ad` is False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("cuda", 0)
#: Memory of the simulated device (bytes).
TOTAL_MEMORY = 8 * 2**30
#: Segment granularity of the allocator model: torch's caching allocator rounds large segments to 2 MiB.
SEGMENT = 2 * 2**20

_MARK = "_simulated_cuda"
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu}
_DATA_DEPENDENT = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                   torch.unique, torch.Tensor.unique, torch.argwhere}
_PINNED_FLAG = "_simulated_pinned"
# Property getters reach a mode as fresh method-wrappers: compared with ==, not ``is``.
_GET_DEVICE, _GET_IS_CUDA, _GET_GRAD = (torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__,
                                        torch.Tensor.grad.__get__)
_SET_DATA = torch.Tensor.data.__set__


_FUSED_RNNS = {"lstm", "gru", "rnn_tanh", "rnn_relu"}


def _in_jvp() -> bool:
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    try:
        return retrieve_current_functorch_interpreter().key() == torch._C._functorch.TransformType.Jvp
    except (RuntimeError, AssertionError):  # no transform active
        return False


def _any_device_tensor(values: Any) -> bool:
    """Whether a device tensor is among ``values`` or one level down in a list, tuple or dict."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if getattr(v, _MARK, False):
                return True
        elif isinstance(v, (list, tuple)):
            if any(isinstance(t, torch.Tensor) and getattr(t, _MARK, False) for t in v):
                return True
        elif isinstance(v, dict):
            if any(isinstance(t, torch.Tensor) and getattr(t, _MARK, False) for t in v.values()):
                return True
    return False


def is_device_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # an index means a CUDA device in torch's conventions
    return torch.device(device).type == "cuda"


@dataclasses.dataclass
class Allocator:
    """Bytes of live device tensors, reserved segments and their peaks, under an optional fraction."""

    total: int = TOTAL_MEMORY
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    fraction: float = 1.0
    live: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # data_ptr -> (bytes, refs)

    def allocate(self, nbytes: int) -> None:
        if self.reserved - self.allocated < nbytes:
            segment = -(-nbytes // SEGMENT) * SEGMENT
            if self.reserved + segment > self.fraction * self.total:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes} bytes (simulated device: {self.reserved} "
                    f"reserved, limit {int(self.fraction * self.total)})")
            self.reserved += segment
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage once while any device tensor viewing it lives."""
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # a torch.func wrapper: its base tensor is counted
            return
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or nbytes == 0:
            return
        size, refs = self.live.get(key, (0, 0))
        if refs == 0:
            self.allocate(nbytes)
            size = nbytes
        self.live[key] = (size, refs + 1)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        size, refs = self.live.get(key, (0, 1))
        if refs <= 1:
            self.live.pop(key, None)
            self.allocated -= size
        else:
            self.live[key] = (size, refs - 1)

    def empty_cache(self) -> None:
        self.reserved = -(-self.allocated // SEGMENT) * SEGMENT

    def stats(self) -> dict[str, Any]:
        def stat(current: int, peak: int) -> dict[str, Any]:
            return {"all": {"current": current, "peak": peak, "allocated": current, "freed": 0}}

        return {"allocated_bytes": stat(self.allocated, self.peak_allocated),
                "reserved_bytes": stat(self.reserved, self.peak_reserved),
                "active_bytes": stat(self.allocated, self.peak_allocated)}

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved


class _DeviceMode(TorchFunctionMode):
    """Runs ``cuda`` tensors on the CPU, marks them, counts their memory and records host syncs."""

    def __init__(self, sim: "SimulatedCuda") -> None:
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        from_device = _any_device_tensor(args) or _any_device_tensor(kwargs.values())
        if func == _GET_DEVICE:
            return DEVICE if from_device else func(*args)
        if func == _GET_IS_CUDA:
            return from_device
        if func is torch.Tensor.get_device:
            return 0 if from_device else func(*args)
        if func == _GET_GRAD:
            grad = func(*args)
            if grad is not None and from_device and not is_device_tensor(grad):
                self._mark(grad, count=True)
            return grad
        if func == _SET_DATA and is_device_tensor(args[1]):
            func(*args)
            self._mark(args[0], count=True)  # Module.to swaps a parameter's data in place
            return None
        if func in (torch.Tensor.pin_memory, torch.Tensor.is_pinned):
            return self._pinning(func, args[0])
        if func in (torch.Tensor.copy_, torch.Tensor.__setitem__) and from_device and not is_device_tensor(args[0]):
            self.sim.record(f"device-to-host read ({func.__name__} into a host tensor)")
            return func(*args, **kwargs)
        if from_device and getattr(func, "__name__", "") in _FUSED_RNNS and _in_jvp():
            self._check_forward_ad()
        if func is torch._C._nn._parse_to:  # reads a device argument, allocates nothing
            return func(*args, **kwargs)
        target = self._target_device(func, args, kwargs)
        if from_device:
            if func in _HOST_READS or (target is not None and not _is_cuda(target)):
                self.sim.record(f"device-to-host read ({getattr(func, '__name__', func)})")
            elif func in _DATA_DEPENDENT:
                self.sim.record(f"data-dependent shape ({getattr(func, '__name__', func)})")
        to_device = target is not None and _is_cuda(target)
        if func is torch.Tensor.cuda:  # computed as a copy on the CPU, marked below
            func, args, kwargs = torch.Tensor.to, (args[0], DEVICE), {}
        if to_device:
            self._check_generator(kwargs)
            if func in (torch.Tensor.to, torch.Tensor.copy_) or func is torch.tensor:
                source = args[0] if func is not torch.Tensor.copy_ else args[1]
                if not is_device_tensor(source) and not getattr(source, _PINNED_FLAG, False):
                    self.sim.record("host-to-device copy from pageable memory")
            args, kwargs = self._on_cpu(func, args, kwargs)
            if func is torch.Tensor.to and not from_device:
                kwargs["copy"] = True  # a CPU tensor moved to the device is a new tensor, not itself
        if kwargs.pop("pin_memory", False) and func is not torch.Tensor.to:
            out = func(*args, **kwargs)
            setattr(out, _PINNED_FLAG, True)
            return out
        out = func(*args, **kwargs)
        if func is torch.Tensor.copy_ and is_device_tensor(args[0]):
            return out
        if from_device and target is not None and not to_device:  # to the host: a new, host tensor
            return out.clone() if out is args[0] else out
        if (from_device and target is None) or to_device:
            tree_map(lambda t: self._mark(t, count=True) if isinstance(t, torch.Tensor) else t, out)
        return out

    def _check_forward_ad(self) -> None:
        """cuDNN's fused RNN has no forward-mode derivative; the native kernels have one unless told otherwise."""
        kernel = "_cudnn_rnn" if torch.backends.cudnn.enabled else (
            None if self.sim.native_rnn_forward_ad else "_thnn_fused_lstm_cell")
        if kernel is not None:
            raise NotImplementedError(f"Trying to use forward AD with {kernel} that does not support it because it "
                                      "has not been implemented yet.")

    def _pinning(self, func: Callable, t: torch.Tensor) -> Any:
        if func is torch.Tensor.is_pinned:
            return bool(getattr(t, _PINNED_FLAG, False))
        out = t.clone()
        setattr(out, _PINNED_FLAG, True)
        return out

    @staticmethod
    def _target_device(func: Callable, args: tuple, kwargs: dict) -> Any:
        if "device" in kwargs:
            return kwargs["device"]
        if func is torch.Tensor.cuda:
            return DEVICE
        if func is torch.Tensor.cpu:
            return torch.device("cpu")
        if func is torch.Tensor.to:
            for a in args[1:]:
                if isinstance(a, (str, torch.device, int)):
                    return a
                if isinstance(a, torch.Tensor):
                    return DEVICE if is_device_tensor(a) else a.device
        if func is torch.Tensor.copy_ and is_device_tensor(args[0]):
            return DEVICE
        return None

    @staticmethod
    def _check_generator(kwargs: dict) -> None:
        gen = kwargs.get("generator")
        if gen is not None and not getattr(gen, _MARK, False):
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")

    @staticmethod
    def _on_cpu(func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def cpu(a: Any) -> Any:
            return torch.device("cpu") if isinstance(a, (str, torch.device)) and _is_cuda(a) else a

        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.to:
            args = (args[0], *(torch.device("cpu") if isinstance(a, int) and not isinstance(a, bool) else cpu(a)
                               for a in args[1:]))
        return args, kwargs

    def _mark(self, t: torch.Tensor, count: bool) -> torch.Tensor:
        if not is_device_tensor(t):
            try:
                setattr(t, _MARK, True)
            except (AttributeError, RuntimeError):
                return t
            if count:
                self.sim.allocator.track(t)
        return t


@dataclasses.dataclass
class SimulatedCuda:
    """The state of one simulated device: its allocator model and the host syncs seen so far."""

    allocator: Allocator = dataclasses.field(default_factory=Allocator)
    syncs: list[str] = dataclasses.field(default_factory=list)
    sync_debug_mode: int = 0
    #: Whether the fused RNN kernels used with cuDNN off have a forward-mode derivative (unknown until run on a GPU).
    native_rnn_forward_ad: bool = True
    fractions: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    def record(self, what: str) -> None:
        self.syncs.append(what)
        if self.sync_debug_mode == 2:
            raise RuntimeError(f"called a synchronizing CUDA operation: {what}")

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[str]]:
        """The syncs recorded inside the block (the list fills as they happen)."""
        start = len(self.syncs)
        seen: list[str] = []
        try:
            yield seen
        finally:
            seen.extend(self.syncs[start:])

    def device_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Mark a CPU tensor as living on the simulated device (for tests building fixtures by hand)."""
        setattr(t, _MARK, True)
        self.allocator.track(t)
        return t


class _Generator(torch.Generator):
    """``torch.Generator(device="cuda")`` under the simulation: a CPU generator marked as the device's."""

    def __new__(cls, device: Any = "cpu") -> "_Generator":
        gen = super().__new__(cls, "cpu")
        setattr(gen, _MARK, _is_cuda(device))
        return gen

    def __init__(self, device: Any = "cpu") -> None:
        pass


def install(monkeypatch: Any) -> SimulatedCuda:
    """Fake the CUDA backend under ``torch.cuda`` for the duration of a test (``monkeypatch`` undoes it)."""
    import torch._dynamo  # noqa: F401  (before the fake backend: importing it probes torch._C's CUDA entry points)

    sim = SimulatedCuda()
    c = torch._C

    def synchronize() -> None:
        sim.record("torch.cuda.synchronize")

    def set_fraction(fraction: float, index: int) -> None:
        sim.fractions.append((fraction, index))
        sim.allocator.fraction = fraction

    def set_debug(mode: int) -> None:
        sim.sync_debug_mode = mode

    def exchange(index: int) -> int:
        return 0

    properties = types.SimpleNamespace(name="Simulated CUDA device", total_memory=TOTAL_MEMORY, major=9, minor=0,
                                       multi_processor_count=1)
    fakes: dict[str, Any] = {
        "_cuda_getDeviceCount": lambda: 1, "_cuda_getDevice": lambda: 0, "_cuda_setDevice": lambda i: None,
        "_cuda_exchangeDevice": exchange, "_cuda_maybeExchangeDevice": exchange, "_cuda_synchronize": synchronize,
        "_cuda_memoryStats": lambda i: sim.allocator.stats(), "_cuda_resetPeakMemoryStats": lambda i: sim.allocator.reset_peaks(),
        "_cuda_setMemoryFraction": set_fraction, "_cuda_emptyCache": sim.allocator.empty_cache,
        "_cuda_set_sync_debug_mode": set_debug, "_cuda_get_sync_debug_mode": lambda: sim.sync_debug_mode,
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(c, name, fake, raising=False)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "_exchange_device", lambda i: -1 if i < 0 else 0)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", lambda i: -1 if i < 0 else 0)
    monkeypatch.setattr(torch.cuda, "_initialized", True)
    monkeypatch.setattr(torch.cuda, "_get_device_properties", lambda i: properties, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "simulated")
    monkeypatch.setattr(torch, "Generator", _Generator)
    monkeypatch.setattr(torch.cuda, "default_generators", (_Generator("cuda"),))
    return sim


@contextlib.contextmanager
def running(sim: SimulatedCuda) -> Iterator[None]:
    """Inside: tensors asked for on ``cuda`` are computed on the CPU as the simulated device's."""
    with _DeviceMode(sim):
        yield
