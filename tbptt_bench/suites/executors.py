"""Where cells run: worker processes on this machine (``local``) or tasks on a Ray cluster (``ray``).

Both executors take a list of cells and yield one :class:`~tbptt_bench.suites.jobs.JobResult` per cell as
cells finish; the caller (the driver) alone writes them into the store. Both run every cell that
does not time anything first, in parallel, and then the timing cells (``perf``) strictly one at a
time, so that no timing shares the machine with another cell of the sweep.

``local`` runs cells in fresh worker processes (``--jobs N`` of them; one by default), so a cell
that crashes its process (a segfault, the out-of-memory killer) is recorded as ``failed`` and the
sweep goes on. When a pool with several workers breaks, the cells that were in flight are rerun one
at a time to find the one that crashes.

``ray`` submits each cell as a Ray task (``num_cpus=1``, plus ``num_gpus=1`` for a cell on
``cuda``) to the cluster at ``--ray-address``, or to a local Ray instance started for the run. The
package is shipped to the workers with the task (``runtime_env`` ``py_modules``), so they run the
driver's code. Timing cells ask for all CPUs of the largest node, which gives them a node alone as far
as Ray schedules.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import tbptt_bench
from tbptt_bench.suites.jobs import GridPoint, JobResult, crashed_result, run_cell
from tbptt_bench.errors import UsageError
from tbptt_bench.registry import PLUGIN_ENV, add_plugin_dirs

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
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


def _work(cell: GridPoint, executor: str, concurrency: int) -> JobResult:
    return run_cell(cell, executor=executor, concurrency=concurrency)


class LocalExecutor:
    """Cells in ``jobs`` fresh worker processes on this machine; timing cells one at a time."""

    name = "local"

    def __init__(self, jobs: int = 1, plugin_dirs: Sequence[str] = (), threads: int = 1) -> None:
        if jobs < 1 or threads < 1:
            raise UsageError(f"--jobs and --threads must be ≥ 1, got {jobs} and {threads}")
        self.jobs = jobs
        self.threads = threads
        self.plugin_dirs = [str(Path(d).resolve()) for d in plugin_dirs]

    def run(self, cells: Sequence[GridPoint]) -> Iterator[JobResult]:
        yield from self._run_pool([c for c in cells if not c.timing], self.jobs, self.threads)
        yield from self._run_pool([c for c in cells if c.timing], 1, None)

    def _new_pool(self, width: int, threads: int | None) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=width, mp_context=_worker_context(),
                                   initializer=_init_worker,
                                   initargs=(self.plugin_dirs, threads, logging.getLogger().level, os.getpid()))

    def _run_pool(self, cells: Sequence[GridPoint], width: int, threads: int | None) -> Iterator[JobResult]:
        queue: deque[GridPoint] = deque(cells)
        suspects: deque[GridPoint] = deque()
        pool: ProcessPoolExecutor | None = None
        try:
            while queue or suspects:
                if pool is None:
                    pool = self._new_pool(width, threads)
                source, limit = (suspects, 1) if suspects else (queue, width)
                in_flight: dict[Future[JobResult], GridPoint] = {}
                broken: list[GridPoint] = []
                while source and len(in_flight) < limit:
                    cell = source.popleft()
                    in_flight[pool.submit(_work, cell, self.name, limit)] = cell
                while in_flight:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                        done, _ = wait(in_flight)  # every other future of a broken pool ends too
                    for fut in done:
                        cell = in_flight.pop(fut)
                        exc = fut.exception()
                        if isinstance(exc, BrokenProcessPool):
                            broken.append(cell)
                        elif isinstance(exc, KeyboardInterrupt):
                            raise exc
                        elif exc is not None:  # the cell or its result could not cross the process boundary
                            message = f"could not run in a worker: {type(exc).__name__}: {exc}"
                            yield crashed_result(cell, message, executor=self.name, concurrency=limit)
                        else:
                            yield fut.result()
                    if broken:
                        break
                    while source and len(in_flight) < limit:
                        cell = source.popleft()
                        in_flight[pool.submit(_work, cell, self.name, limit)] = cell
                if broken:
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = None
                    if len(broken) == 1:
                        log.warning("cell %s (%s): %s", broken[0].key, broken[0].label, CRASHED)
                        yield crashed_result(broken[0], CRASHED, executor=self.name, concurrency=limit)
                    else:
                        log.warning("a worker died with %d cells in flight; rerunning them one at a time",
                                    len(broken))
                        suspects.extend(broken)
            if pool is not None:
                pool.shutdown(wait=True)  # idle workers exit before anything else (a timing cell) starts
                pool = None
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


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


def make_executor(name: str, *, jobs: int | None = None, ray_address: str | None = None,
                  plugin_dirs: Sequence[str] = (), threads: int = 1) -> Executor:
    """An executor by name (``local`` or ``ray``); ``jobs`` defaults to 1 locally, all CPUs for Ray.

    ``threads`` is the torch thread count of every cell that times nothing (timing cells set their own).
    """
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be ≥ 1, got {jobs}")
    if threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {threads}")
    if name == "local":
        if ray_address:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(jobs or 1, plugin_dirs, threads)
    if name == "ray":
        if ray_address and jobs:
            raise UsageError("--jobs sizes a local Ray instance; with --ray-address the cluster decides")
        return RayExecutor(ray_address, jobs, plugin_dirs, threads)
    raise UsageError(f"unknown executor {name!r}; accepted: {', '.join(EXECUTORS)}")
