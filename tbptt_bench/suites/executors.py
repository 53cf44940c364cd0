"""Where cells run: worker processes on this machine (``local``) or tasks on a Ray cluster (``ray``).

Both executors take a list of cells and yield one :class:`~tbptt_bench.suites.jobs.JobResult` per cell as
cells finish; the caller (the driver) alone writes them into the store. Both run every cell that
does not time anything first, in parallel, and then the timing cells (``perf``) strictly one at a
time, so that no timing shares the machine with another cell of the sweep.

``local`` runs cells in warm worker processes (``--jobs N`` of them; one by default), forked from a
server that imported torch once. A worker runs one cell after another, each from the state the worker
started with (:class:`ProcessState`), so a cell computes what it would in a fresh process without paying
for one. A cell that crashes its worker (a segfault, the out-of-memory killer) is recorded as
``failed``, a cell past its time limit is stopped with its worker's process group and recorded as
``timeout``, a cell that ran out of memory retires its worker too; a fresh worker takes the next cell and
the sweep goes on. Timing cells share this: a ``perf`` cell's worker only waits while the measurement
runs in a new interpreter of its own (:func:`tbptt_bench.perf.child.measure_in_fresh_process`).

``ray`` submits each cell as a Ray task (``num_cpus=1``, plus ``num_gpus=1`` for a cell on
``cuda``) to the cluster at ``--ray-address``, or to a local Ray instance started for the run. The
package is shipped to the workers with the task (``runtime_env`` ``py_modules``), so they run the
driver's code. Timing cells ask for all CPUs of the largest node, which gives them a node alone as far
as Ray schedules.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import tbptt_bench
from tbptt_bench.suites.jobs import GridPoint, JobResult, crashed_result, run_cell
from tbptt_bench.suites.schema import utc_now
from tbptt_bench.errors import UsageError
from tbptt_bench.suites import EXECUTORS
from tbptt_bench.registry import PLUGIN_ENV, add_plugin_dirs

log = logging.getLogger(__name__)

STARTED = "started"
#: Seconds a new worker may take to start (fork, plugins) before its first cell's time limit starts to count.
STARTUP_S = 120.0
CRASHED = ("the worker process running this cell died abruptly (killed by a signal, e.g. by the "
           "out-of-memory killer, or crashed)")


class Executor(Protocol):
    """Runs cells and yields their results as they finish."""

    name: str

    def run(self, cells: Sequence[GridPoint]) -> Iterator[JobResult]: ...


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes: forked from a server that imported torch once (spawn where unavailable).

    Workers never inherit the driver's state (its open store lock, its threads); a pool that is
    replaced after a crash costs a fork, not another interpreter start.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tbptt_bench.suites.jobs"])
        return ctx
    return multiprocessing.get_context("spawn")


def _driver_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _exit_with_driver(pid: int, period: float = 1.0) -> None:
    """End this worker when the driver dies (killed with SIGKILL, a pool worker would wait forever)."""
    while _driver_alive(pid):
        time.sleep(period)
    os._exit(1)


def _init_worker(plugin_dirs: Sequence[str], threads: int | None, level: int, driver: int | None = None) -> None:
    if driver is not None:
        threading.Thread(target=_exit_with_driver, args=(driver,), daemon=True, name="driver-watch").start()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if plugin_dirs:
        add_plugin_dirs(plugin_dirs)
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass
class ProcessState:
    """What a cell can change in its process that a later cell in the same worker would see.

    A warm worker captures this right after it starts (a fresh process's state) and restores it before
    every cell, so a cell runs as it would in a fresh process: same global RNG states (torch, CUDA,
    numpy, :mod:`random`), default dtype and device, thread count, autograd modes, deterministic and
    precision switches, environment, working folder and ``sys.path``.
    """

    torch_rng: Any
    torch_seed: int
    numpy_rng: Any
    python_rng: Any
    dtype: Any
    device: Any
    threads: int
    grad: bool
    anomaly: tuple[bool, bool]
    deterministic: tuple[bool, bool]
    matmul_precision: str
    cudnn: tuple[bool, bool]
    environ: dict[str, str]
    cwd: str
    path: list[str]

    @classmethod
    def capture(cls) -> "ProcessState":
        """This process's state now."""
        import random

        import numpy as np
        import torch

        return cls(torch.get_rng_state(), torch.initial_seed(), np.random.get_state(), random.getstate(),
                   torch.get_default_dtype(), torch.get_default_device(), torch.get_num_threads(),
                   torch.is_grad_enabled(), (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
                   (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()),
                   torch.get_float32_matmul_precision(),
                   (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
                   dict(os.environ), os.getcwd(), list(sys.path))

    def restore(self) -> None:
        """Put this process back into the captured state (and free what earlier cells left behind)."""
        import random

        import numpy as np
        import torch

        torch.set_rng_state(self.torch_rng)
        if torch.cuda.is_initialized():  # a fresh process's CUDA generators start from the default seed
            torch.cuda.manual_seed_all(self.torch_seed)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)
        torch.set_default_dtype(self.dtype)
        if torch.get_default_device() != self.device:  # a fresh process has no default-device mode
            torch.set_default_device(None)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_grad_enabled(self.grad)
        torch.autograd.set_detect_anomaly(*self.anomaly)
        torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.cudnn
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        os.chdir(self.cwd)
        sys.path[:] = self.path
        gc.collect()


def _worker_main(conn: Connection, initargs: tuple[Any, ...], executor: str, concurrency: int) -> None:
    """A warm worker: cells one after another, each from the state the worker started with.

    The worker leads a process group of its own, so that stopping it at a cell's time limit stops
    that cell's own child processes too. It ends when the driver closes its end of the pipe.
    """
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    _init_worker(*initargs)
    fresh = ProcessState.capture()
    while True:
        try:
            cell: GridPoint = conn.recv()
        except (EOFError, OSError):
            return
        fresh.restore()
        try:
            conn.send(STARTED)  # the time limit counts from here: process start-up is not the cell's time
        except OSError:  # the driver was stopped (SIGTERM, SIGINT) while this worker took the cell: end quietly
            os._exit(1)
        result = run_cell(cell, executor=executor, concurrency=concurrency)
        try:
            conn.send(result)
        except OSError:  # the driver is gone
            os._exit(1)
        except Exception as exc:  # a result that cannot be pickled
            conn.send(crashed_result(cell, f"could not return its result: {type(exc).__name__}: {exc}",
                                     executor=executor, concurrency=concurrency))


class Worker:
    """A worker process that runs cells one at a time, stopped (with its process group) at a cell's time limit.

    After a cell that ended normally the worker is reused (:attr:`usable`); a cell that crashed it, ran
    past its limit or ran out of memory retires it, and the executor starts a fresh one.
    """

    def __init__(self, ctx: Any, initargs: tuple[Any, ...], executor: str, concurrency: int) -> None:
        self.executor, self.concurrency = executor, concurrency
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, initargs, executor, concurrency),
                                name="tbptt-bench-worker")
        self.proc.start()
        child.close()
        self.cell: GridPoint | None = None
        self.cells_run = 0
        self.usable = True
        self.deadline = math.inf

    def submit(self, cell: GridPoint) -> None:
        """Hand the worker its next cell; its first cell's limit also allows for the worker's start-up."""
        self.cell, self.started, self.t0 = cell, utc_now(), time.monotonic()
        self.deadline = self.t0 + STARTUP_S + cell.time_limit if cell.time_limit else math.inf
        try:
            self.conn.send(cell)
        except OSError:  # the worker died before it took the cell; poll() sees the death
            pass

    def poll(self, now: float) -> JobResult | None:
        """The cell's result once it has one (finished, crashed or past its limit); None while it runs."""
        assert self.cell is not None, "poll() needs a submitted cell"
        cell = self.cell
        while self.conn.poll():
            try:
                result: JobResult | str = self.conn.recv()
            except (EOFError, OSError):
                log.warning("cell %s (%s): %s", cell.key, cell.label, CRASHED)
                self.stop()
                return self._failed(CRASHED)
            if result == STARTED:
                self.started, self.t0 = utc_now(), time.monotonic()
                self.deadline = self.t0 + cell.time_limit if cell.time_limit else math.inf
                continue
            assert isinstance(result, JobResult)
            self.cell, self.deadline = None, math.inf
            self.cells_run += 1
            if result.status == "oom":  # the process's heap (or CUDA state) may not be whole: start afresh
                self.stop()
            return result
        if not self.proc.is_alive():
            log.warning("cell %s (%s): %s", cell.key, cell.label, CRASHED)
            self.stop()
            return self._failed(CRASHED)
        if now >= self.deadline:
            elapsed = now - self.t0
            self.stop()
            log.warning("cell %s (%s): stopped at its time limit of %g s", cell.key, cell.label, cell.time_limit)
            message = f"timeout: stopped after {elapsed:.1f} s, at its time limit of {cell.time_limit:g} s"
            return self._failed(message, status="timeout", duration_s=elapsed)
        return None

    def _failed(self, message: str, status: str = "failed", duration_s: float = 0.0) -> JobResult:
        assert self.cell is not None
        result = crashed_result(self.cell, message, executor=self.executor, concurrency=self.concurrency,
                                status=status, started=self.started, duration_s=duration_s)
        self.cell, self.deadline = None, math.inf
        return result

    def stop(self) -> None:
        """Kill the worker's process group (a cell's own children included) and reap the worker."""
        self.usable = False
        for kill in (lambda: os.killpg(self.proc.pid, signal.SIGKILL), self.proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        self._reap()

    def close(self) -> None:
        """End an idle worker: it leaves its loop when the pipe closes; one that does not is killed."""
        self.usable = False
        self.conn.close()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.stop()

    def _reap(self) -> None:
        self.proc.join(timeout=30)
        self.conn.close()

    def run(self, cell: GridPoint) -> JobResult:
        """Run one cell and block until it has a result."""
        self.submit(cell)
        while True:
            wait([self.conn, self.proc.sentinel], timeout=max(0.0, min(self.deadline - time.monotonic(), 3600)))
            result = self.poll(time.monotonic())
            if result is not None:
                return result


class LocalExecutor:
    """Cells in warm worker processes on this machine, ``jobs`` at a time; timing cells one at a time.

    ``cells_per_worker`` retires a worker after that many cells (``1``: a fresh process for every cell,
    the behaviour before warm workers; ``None``: no limit).
    """

    name = "local"

    def __init__(self, jobs: int = 1, plugin_dirs: Sequence[str] = (), threads: int = 1,
                 cells_per_worker: int | None = None) -> None:
        if jobs < 1 or threads < 1:
            raise UsageError(f"--jobs and --threads must be ≥ 1, got {jobs} and {threads}")
        if cells_per_worker is not None and cells_per_worker < 1:
            raise UsageError(f"cells_per_worker must be ≥ 1 or None, got {cells_per_worker}")
        self.jobs = jobs
        self.threads = threads
        self.cells_per_worker = cells_per_worker
        self.plugin_dirs = [str(Path(d).resolve()) for d in plugin_dirs]

    def run(self, cells: Sequence[GridPoint]) -> Iterator[JobResult]:
        yield from self._run_many([c for c in cells if not c.timing], self.jobs, self.threads)
        yield from self._run_many([c for c in cells if c.timing], 1, None)

    def _run_many(self, cells: Sequence[GridPoint], width: int, threads: int | None) -> Iterator[JobResult]:
        if not cells:
            return
        ctx = _worker_context()
        initargs = (self.plugin_dirs, threads, logging.getLogger().level, os.getpid())
        queue: deque[GridPoint] = deque(cells)
        idle: list[Worker] = []
        busy: list[Worker] = []
        try:
            while queue or busy:
                while queue and len(busy) < width:
                    worker = self._idle_worker(idle) or Worker(ctx, initargs, self.name, width)
                    worker.submit(queue.popleft())
                    busy.append(worker)
                deadline = min(w.deadline for w in busy)
                timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
                wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=timeout)
                now = time.monotonic()
                for worker in list(busy):
                    result = worker.poll(now)
                    if result is None:
                        continue
                    busy.remove(worker)
                    if worker.usable and worker.cells_run != self.cells_per_worker:
                        idle.append(worker)
                    elif worker.usable:
                        worker.close()
                    yield result
        finally:
            for worker in busy:
                worker.stop()
            for worker in idle:
                worker.close()

    @staticmethod
    def _idle_worker(idle: list[Worker]) -> Worker | None:
        """A live idle worker (one that died while idle, e.g. at the out-of-memory killer's hand, is dropped)."""
        while idle:
            worker = idle.pop()
            if worker.proc.is_alive():
                return worker
            worker.stop()
        return None


AUTH_HINT = ("; if the cluster uses token authentication, copy the head node's ~/.ray/auth_token here or set "
             "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH); RAY_AUTH_MODE=disabled turns it off")


def use_token_auth() -> bool:
    """Send Ray's authentication token when connecting by address, if one is available (README, Ray).

    ``ray start --head`` turns token authentication on when a token exists (``~/.ray/auth_token``,
    ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``), but a client given an explicit address does not
    send it unless ``RAY_AUTH_MODE=token``. So with ``RAY_AUTH_MODE`` unset and a token available,
    this sets it (a cluster without authentication accepts such a client too). True when it did.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return False
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or path.is_file()):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # a Ray imported before this point caches its configuration: refresh it
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass
    return True


def _ray_task(cell: GridPoint, concurrency: int, plugin_dirs: Sequence[str], threads: int | None,
              level: int) -> JobResult:
    if cell.time_limit:  # a process of its own, stopped at the limit
        worker = Worker(_worker_context(), (plugin_dirs, threads, level, os.getpid()), "ray", concurrency)
        try:
            return worker.run(cell)
        finally:
            worker.close()
    _init_worker(plugin_dirs, threads, level)
    return run_cell(cell, executor="ray", concurrency=concurrency)


class RayExecutor:
    """Cells as Ray tasks on a cluster (``address``) or a local Ray instance (``address=None``)."""

    name = "ray"

    def __init__(self, address: str | None = None, jobs: int | None = None,
                 plugin_dirs: Sequence[str] = (), threads: int = 1) -> None:
        self.address = address
        self.jobs = jobs
        self.threads = threads
        self.plugin_dirs = [str(Path(d).resolve()) for d in plugin_dirs]
        self._check_reachable()

    def _runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {"py_modules": [str(Path(tbptt_bench.__file__).resolve().parent)]}
        if os.environ.get(PLUGIN_ENV):
            env["env_vars"] = {PLUGIN_ENV: os.environ[PLUGIN_ENV]}
        return env

    def _check_reachable(self) -> None:
        """Fail fast on an address nobody listens at (Ray itself retries for minutes)."""
        if not self.address or self.address == "auto":
            return
        host, sep, port = self.address.removeprefix("ray://").rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--ray-address {self.address!r} is not HOST:PORT or ray://HOST:PORT")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise UsageError(f"cannot reach the Ray cluster at {self.address} ({exc.strerror or exc}); start it "
                             "with `ray start --head` or check --ray-address") from None

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local instance); True when this executor must shut Ray down."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING, "configure_logging": False,
                                  "runtime_env": self._runtime_env()}
        if self.address is None and self.jobs:
            kwargs["num_cpus"] = self.jobs
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            hint = AUTH_HINT if self.address else ""
            raise UsageError(f"cannot connect to {where}: {str(exc).splitlines()[0] if str(exc) else exc}; check "
                             f"--ray-address (e.g. HEAD:6379 or ray://HEAD:10001){hint}") from None
        return True

    def run(self, cells: Sequence[GridPoint]) -> Iterator[JobResult]:
        if self.address:
            use_token_auth()
        try:
            import ray
        except ModuleNotFoundError:
            raise UsageError("--executor ray needs Ray; install it with: pip install 'tbptt-bench[ray]'") from None
        owned = self._connect(ray)
        try:
            resources = ray.cluster_resources()
            gpu_cells = [c for c in cells if c.device.startswith("cuda")]
            if gpu_cells and resources.get("GPU", 0) < 1:
                raise UsageError(f"{len(gpu_cells)} cells run on cuda but the Ray cluster has no GPU; "
                                 "add GPU nodes or change the suite's device")
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            node_cpus = max((n.get("Resources", {}).get("CPU", 1) for n in nodes), default=1)
            total_cpus = int(resources.get("CPU", 1))
            remote = ray.remote(max_retries=0)(_ray_task)
            level = logging.getLogger().level

            def submit(cell: GridPoint, cpus: float, concurrency: int) -> Any:
                gpus = 1 if cell.device.startswith("cuda") else 0
                threads = None if cell.timing else self.threads
                return remote.options(num_cpus=cpus, num_gpus=gpus).remote(
                    cell, concurrency, self.plugin_dirs, threads, level)

            pending = {submit(c, 1, total_cpus): c for c in cells if not c.timing}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    yield self._result(ray, ref, pending.pop(ref), total_cpus)
            for cell in (c for c in cells if c.timing):
                yield self._result(ray, submit(cell, node_cpus, 1), cell, 1)
        finally:
            if owned:
                ray.shutdown()

    def _result(self, ray: Any, ref: Any, cell: GridPoint, concurrency: int) -> JobResult:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            message = f"Ray could not run the cell: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("cell %s (%s): %s", cell.key, cell.label, message)
            return crashed_result(cell, message, executor=self.name, concurrency=concurrency)


def default_jobs(threads: int = 1) -> int:
    """Local workers for cells that time nothing: one per ``threads`` of the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // threads)


def make_executor(name: str, *, jobs: int | None = None, ray_address: str | None = None,
                  plugin_dirs: Sequence[str] = (), threads: int = 1) -> Executor:
    """An executor by name (``local`` or ``ray``); ``jobs`` defaults to :func:`default_jobs` locally, all CPUs for Ray.

    ``threads`` is the torch thread count of every cell that times nothing (timing cells set their own).
    """
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be ≥ 1, got {jobs}")
    if threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {threads}")
    if name == "local":
        if ray_address:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(jobs or default_jobs(threads), plugin_dirs, threads)
    if name == "ray":
        if ray_address and jobs:
            raise UsageError("--jobs sizes a local Ray instance; with --ray-address the cluster decides")
        return RayExecutor(ray_address, jobs, plugin_dirs, threads)
    raise UsageError(f"unknown executor {name!r}; accepted: {', '.join(EXECUTORS)}")
