"""The fresh-process protocol: each configuration measured in a new process (docs/perf.md).

The parent writes the configuration as JSON into a temporary folder ``tbptt-perf-<parent pid>-*`` and
reads the row the measuring process wrote; a process that dies is classified by how it died. On POSIX
that process is forked from a *measuring server* (:class:`MeasuringServer`): an isolated interpreter
(``python -I``: no PYTHONPATH, no user site, not the current folder) that imports the package from exactly
the folder the parent imported it from (:func:`child_command`), imports torch and what the measurement
needs, computes nothing, and forks one child per configuration. Each configuration thus starts in a new
process with no tensor memory, caches or thread pools from earlier ones, without paying the interpreter's
and torch's start-up (about 5 s here) each time. Elsewhere each configuration starts its own interpreter.
Folders left by killed parents are removed by the next run (:func:`remove_stale_temp_dirs`).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from tbptt_bench.core.build import resolve_device
from tbptt_bench.errors import UsageError
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.perf.harness import busy_message, empty_row, measure, refuse_if_busy
from tbptt_bench.perf.memory import limit_address_space
from tbptt_bench.perf.tables import to_frame, write_json_atomic

log = logging.getLogger(__name__)


TEMP_PREFIX = "tbptt-perf-"
_TEMP_NAME = re.compile(r"^tbptt-perf-(\d+)-")
#: Run by ``python -I -c``: put the parent's package folder first on sys.path, then run :func:`main`.
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from tbptt_bench.perf.child import main; sys.exit(main(sys.argv[2:]))"
#: Modules whose files the child checks against the parent's: the package and what it measures with.
CHECKED_MODULES = ("tbptt_bench", "torch", "numpy")


def _module_file(name: str) -> str:
    return str(Path(sys.modules[name].__file__ or "").resolve()) if name in sys.modules else ""


def child_command(cfg_path: Path | None, out_path: Path | None) -> list[str]:
    """The command that measures ``cfg_path`` in an isolated interpreter running the parent's code (both None:
    the command of a :class:`MeasuringServer`).

    ``-I`` ignores PYTHON* variables and the user site and leaves the current folder off sys.path;
    the bootstrap inserts the folder holding the parent's ``tbptt_bench`` first, and the child checks
    that the package, torch and numpy it imported are the parent's files (:data:`CHECKED_MODULES`).
    """
    import tbptt_bench

    root = Path(tbptt_bench.__file__).resolve().parent.parent
    expect = [f"{name}={_module_file(name)}" for name in CHECKED_MODULES]
    mode = ["--serve"] if cfg_path is None else ["--child", str(cfg_path), str(out_path)]
    return [sys.executable, "-I", "-c", _BOOTSTRAP, str(root), *mode, *(arg for e in expect for arg in ("--expect", e))]


def _plugin_env() -> dict[str, str]:
    """The parent's environment with every plugin folder it uses named in ``TBPTT_BENCH_PLUGINS``."""
    from tbptt_bench import registry

    env = dict(os.environ)
    plugin_dirs = [p for p in env.get(registry.PLUGIN_ENV, "").split(os.pathsep) if p]
    plugin_dirs += [str(p) for p in sorted(registry._loaded_dirs)]
    if plugin_dirs:
        env[registry.PLUGIN_ENV] = os.pathsep.join(dict.fromkeys(plugin_dirs))
    return env


def _child_env(cfg: PerfConfig) -> dict[str, str]:
    """A single-configuration child's environment: the parent's, plugin folders named, thread counts set."""
    env = _plugin_env()
    threads = str(cfg.resolved_threads())
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_dirs(root: Path | None = None) -> list[Path]:
    """Remove ``tbptt-perf-<pid>-*`` folders in ``root`` (the temp folder) whose pid is not alive.

    Only folders of this user named with a pid, and only when that process no longer exists (a live
    run's folders, and any folder whose pid was reused, stay); POSIX only. Returns what was removed.
    """
    if os.name != "posix":
        return []
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for path in root.glob(TEMP_PREFIX + "*"):
        match = _TEMP_NAME.match(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match.group(1))
        if pid <= 0 or _pid_alive(pid) or path.stat().st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info("removed %s, left by process %d, which no longer runs", path, pid)
    return removed


def measure_in_fresh_process(cfg: PerfConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measure one configuration in a new process (so memory and caches start clean).

    The process is forked from this parent's :class:`MeasuringServer` (POSIX), or is a new interpreter
    (elsewhere, or with ``TBPTT_PERF_SERVER=0``). It runs :func:`measure` and writes its row to a file; one
    that times out gives status ``timeout``, one killed by SIGKILL (the out-of-memory killer's signal)
    ``oom``, any other death ``failed`` with the end of its stderr.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    remove_stale_temp_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        cfg_path, out_path, err_path = Path(tmp) / "config.json", Path(tmp) / "row.json", Path(tmp) / "stderr.txt"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        if _use_server():
            try:
                server = MeasuringServer.for_environment(_plugin_env())
            except ServerError as exc:
                returncode, stderr = 2, str(exc)
            else:
                returncode = server.measure(cfg_path, out_path, err_path, timeout)
                stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
        else:
            try:
                proc = subprocess.run(child_command(cfg_path, out_path), capture_output=True, text=True,
                                      timeout=timeout, env=_child_env(cfg))
                returncode, stderr = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired:
                returncode, stderr = None, ""
        if returncode is not None and out_path.exists():
            row = json.loads(out_path.read_text())
            row["fresh_process"] = True
            return row
    row = empty_row(cfg, device)
    row.update(fresh_process=True, pid=None)
    if returncode is None:
        row.update(status="timeout", error=f"no result after {timeout} s")
    elif returncode == -signal.SIGKILL:
        row.update(status="oom", error="killed by SIGKILL (most likely the kernel's out-of-memory killer)")
    else:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        row.update(status="failed", error=f"child exited with status {returncode}: {tail}"[:500])
    return row


#: Set to 0 to start a new interpreter for every configuration instead of forking from a measuring server.
SERVER_ENV = "TBPTT_PERF_SERVER"
#: What the server imports before it forks: everything a measurement imports (torch's optimisers import
#: torch._dynamo on first use, about 3 s), so that no child spends its time importing.
SERVER_PRELOAD = ("torch", "torch._dynamo", "tbptt_bench.perf.harness", "tbptt_bench.core.build")


def _use_server() -> bool:
    return hasattr(os, "fork") and os.environ.get(SERVER_ENV, "1") != "0"


class ServerError(RuntimeError):
    """The measuring server could not start (its stderr's last lines are the message)."""


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent exits (a measuring server or child outlives no one)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class MeasuringServer:
    """An isolated interpreter that has imported what a measurement needs and forks one child per configuration.

    One server per parent process, for its environment (plugin folders; a new environment replaces the server),
    started on first use and stopped when the parent exits (or when its standard input closes: a killed
    parent's server ends by itself). It answers each request (JSON lines on its standard input) with the child's pid and then its exit status, in
    ``subprocess`` convention (``-N``: killed by signal N). It computes nothing itself, so a child starts with
    no tensor memory, allocator cache or intra-op thread pool of its own parent's making.
    """

    #: This process's server, if one was started (one at a time: each holds an interpreter with torch imported).
    current: "MeasuringServer | None" = None

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-server-"))
        self.log = self.folder / "stderr.txt"
        with open(self.log, "wb") as err:
            cmd = child_command(None, None)
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        self._buffer = b""
        ready = self._reply(timeout=600.0)
        if ready is None or "ready" not in ready:
            self.close()
            raise ServerError(self._log_tail())

    @classmethod
    def for_environment(cls, env: dict[str, str]) -> "MeasuringServer":
        """This process's server for ``env``, started if there is none or the last one died."""
        server = cls.current
        if server is None or server.env != env or server.proc.poll() is not None:
            cls.close_current()
            server = cls.current = cls(env)
        return server

    @classmethod
    def close_current(cls) -> None:
        if cls.current is not None:
            cls.current.close()
            cls.current = None

    def measure(self, cfg_path: Path, out_path: Path, err_path: Path, timeout: float | None) -> int | None:
        """Fork a child that measures ``cfg_path`` into ``out_path``; its exit status (None: timed out, killed)."""
        request = {"config": str(cfg_path), "row": str(out_path), "stderr": str(err_path)}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        started = self._reply(timeout=60.0)
        if started is None or "pid" not in started:
            return self._died()
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._reply(deadline=deadline)
        if done is not None:
            return int(done["exit"])
        if self.proc.poll() is not None:
            return self._died()
        try:  # past its time: kill the child, the server reaps it
            os.kill(int(started["pid"]), signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reply(timeout=60.0)
        return None

    def close(self) -> None:
        """Stop the server (it exits when its standard input closes) and remove its folder."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _died(self) -> int:
        log.warning("the measuring server exited: %s", self._log_tail())
        self.close()
        return 1

    def _log_tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-3:]) or "no message"

    def _reply(self, timeout: float | None = None, deadline: float | None = None) -> dict[str, Any] | None:
        """The server's next JSON line, or None when it ends or the time is up."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


atexit.register(MeasuringServer.close_current)


def _serve() -> int:
    """The measuring server's loop (see :class:`MeasuringServer`): fork, measure in the child, report its status."""
    _die_with_parent()
    for name in SERVER_PRELOAD:
        __import__(name)
    out = sys.stdout.buffer

    def reply(message: dict[str, Any]) -> None:
        out.write((json.dumps(message) + "\n").encode())
        out.flush()

    reply({"ready": os.getpid()})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_forked_child(request))
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"exit": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)})
    return 0


def _forked_child(request: dict[str, str]) -> int:
    """Measure one configuration in a child of the server; stderr goes to the request's file."""
    try:
        _die_with_parent()
        fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        os.dup2(fd, 1)  # the server's stdout carries the protocol: nothing else may write there
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the requests are the server's to read
        os.close(null)
        return _run_child(request["config"], request["row"])
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _run_child(cfg_path: str, out_path: str) -> int:
    """Measure ``cfg_path`` into ``out_path`` in this process; a UsageError is one line on stderr and status 2."""
    try:
        return _child_main(cfg_path, out_path)
    except UsageError as exc:
        print(f"tbptt-bench perf: error: {exc}", file=sys.stderr)
        return 2


def _child_main(cfg_path: str, out_path: str) -> int:
    gc.freeze()  # what the imports made lives on: the harness's full collections need not walk it (1 s each here)
    cfg = PerfConfig(**json.loads(Path(cfg_path).read_text()))
    device = resolve_device(cfg.device)
    limiter = limit_address_space(cfg.memory_limit) if cfg.memory_limit is not None and device.type != "cuda" else None
    row = measure(cfg, limit_memory=limiter, isolated=True)
    row["pid"] = os.getpid()
    write_json_atomic(Path(out_path), row)
    return 0


def perf_grid(
    configs: Sequence[PerfConfig],
    *,
    fresh: bool = True,
    timeout: float | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    strict: bool = False,
) -> pd.DataFrame:
    """Measure every configuration (each in its own process unless ``fresh`` is False); one row each.

    All configurations are checked before the first runs; a failing or out-of-memory one is recorded
    and the grid goes on. A row measured on a busy machine is logged as a warning; with ``strict`` its
    status becomes ``busy`` (:func:`tbptt_bench.perf.harness.refuse_if_busy`).
    """
    for cfg in configs:
        cfg.validate()
    rows = []
    for cfg in configs:
        row = measure_in_fresh_process(cfg, timeout) if fresh else measure(cfg)
        if row.get("busy") is True:
            log.warning("perf %s %s T=%d: %s", cfg.model, row["method"], cfg.seq_len, busy_message(row))
        if strict:
            row = refuse_if_busy(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return to_frame(rows)


def _check_origins(expected: list[str]) -> str | None:
    """None if every ``NAME=FILE`` names the file this process imported NAME from, else what differs."""
    for item in expected:
        name, _, path = item.partition("=")
        if name not in sys.modules:
            __import__(name)
        found = _module_file(name)
        if path and found != path:
            return (f"the measuring child imported {name} from {found}, the parent from {path}; "
                    f"install it where an isolated interpreter (python -I) finds the parent's copy")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the measuring child (started by :func:`child_command`): ``--child CONFIG.json ROW.json``,
    or of the measuring server: ``--serve``."""
    parser = argparse.ArgumentParser(prog="python -m tbptt_bench.perf.child")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--child", nargs=2, metavar=("CONFIG", "ROW"))
    mode.add_argument("--serve", action="store_true", help="fork one measuring child per request on stdin")
    parser.add_argument("--expect", action="append", default=[], metavar="MODULE=FILE",
                        help="fail unless MODULE was imported from FILE (the parent's copy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mismatch = _check_origins(args.expect)
    if mismatch is not None:
        print(f"tbptt-bench perf: error: {mismatch}", file=sys.stderr)
        return 2
    return _serve() if args.serve else _run_child(*args.child)


if __name__ == "__main__":
    sys.exit(main())
