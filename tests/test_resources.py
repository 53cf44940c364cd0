"""Resources that run out while a command works, and SIGTERM (docs/reliability.md, "Faults and outcomes").

A full disk is a real one: a small tmpfs mounted for the test and filled up (the tests are skipped where
mounting is not permitted; then the save commands are checked through a write wrapper that raises ENOSPC).
Every command runs as a real CLI process, except where a test says otherwise. Each case checks the one
line on stderr, the exit status, that nothing committed was lost and that the next run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from tbptt_bench.cli import main
from tbptt_bench.errors import (EXIT_RESOURCE, EXIT_TERMINATED, EXIT_USAGE, ResourceError, UsageError,
                                resource_cause, touching)
from tbptt_bench.suites import store as store_module
from tbptt_bench.suites.store import check_store, read_results, read_tables
from tbptt_bench.validation import MEMORY_SHARE, available_memory
from test_run import TINY

ROOT = Path(__file__).resolve().parents[1]

#: test_run's tiny suite with one task and model, two updates: ``{methods}`` is filled in.
MINI = TINY.split("[[train]]")[0] + """[[train]]
task = "adding"
model = "rnn"
method = {methods}
steps = 2
eval_every = 1
eval_batches = 1
"""
THREE = '["full", "chunked:k=4", "sliding:k=2"]'
FIVE = '["full", "chunked:k=4", "sliding:k=2", "chunked:k=2", "sliding:k=4"]'
REPORT = ["--resamples", "100", "--dpi", "20", "--formats", "png"]


# --------------------------------------------------------------------------- helpers

def cli(*argv: str, **popen: Any) -> subprocess.Popen:
    """``tbptt-bench ARGV`` in a process of its own (a session of its own, so its workers can be found)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tbptt_bench.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_line(err: str) -> str:
    """stderr that must be exactly one line, without its newline."""
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err[:-1]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(store: Path) -> pd.DataFrame:
    """The committed rows of every table, by key and table, in a form that compares exactly."""
    frames = []
    for name, frame in read_tables(store).items():
        frames.append(frame.astype(str).assign(table=name))
    return pd.concat(frames, ignore_index=True).sort_values(["table", "key"]).reset_index(drop=True)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the test, unmounted afterwards; skip where not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up, then free ``leave`` bytes; the filler file's path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\1" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    try:
        while True:
            os.write(fd, b"\1" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of a three-cell suite (run once per module), its suite file and a five-cell one."""
    folder = tmp_path_factory.mktemp("three")
    (folder / "three.toml").write_text(MINI.format(methods=THREE))
    (folder / "five.toml").write_text(MINI.format(methods=FIVE))
    assert main(["run", str(folder / "three.toml"), "--results", str(folder / "res"), "--quiet"]) == 0
    return folder


def copy_store(three: Path, results: Path) -> Path:
    """A copy of the three-cell store under ``results``; its path."""
    results.mkdir(parents=True, exist_ok=True)
    shutil.copytree(three / "res" / "tiny", results / "tiny")
    return results / "tiny"


# --------------------------------------------------------------------------- the error itself

def test_the_cause_is_found_behind_what_a_library_raised_instead() -> None:
    """matplotlib's PDF writer, closing a file it could not write, raises AttributeError while handling the
    ENOSPC: the cause is found in the chain, and the line names the path and says what to do."""
    def pdf_writer() -> None:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            raise AttributeError("'Stream' object has no attribute 'pos'")

    with pytest.raises(ResourceError) as info:
        with touching(Path("reports/x")):
            pdf_writer()
    assert str(info.value).startswith("cannot write reports/x: no space left on the device (ENOSPC); free some space")
    assert resource_cause(ValueError("unrelated")) is None
    hidden = UsageError("results file x is damaged")
    hidden.__context__ = OSError(errno.EACCES, "denied")
    hidden.__suppress_context__ = True
    assert resource_cause(hidden) is None, "a context dropped with `from None` is not the cause"
    with pytest.raises(UsageError):  # a deliberate message passes unchanged
        with touching(Path("x")):
            raise hidden


# --------------------------------------------------------------------------- a full disk

def test_a_fresh_store_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path: Path, three: Path) -> None:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        code, out, err = finish(cli("run", str(three / "three.toml"), "--results", str(disk / "res"), "--quiet"))
        line = one_line(err)
        assert code == EXIT_RESOURCE and "no space left on the device (ENOSPC)" in line, line
        assert f"cannot write {disk / 'res' / 'tiny'}" in line, line
        assert not [p for p in (disk / "res").rglob("*") if "tmp" in p.name], "no half-written file is left"


@pytest.mark.slow
def test_a_full_disk_during_run_keeps_every_commit_and_the_next_run_resumes(tmp_path: Path, three: Path) -> None:
    """Five cells, three already stored; space for one more cell's part only: the run commits it, fails at
    the next commit, cannot compact; a run on the still-full disk fails at its first compaction; once space
    is free, the next run measures exactly the last cell and every row stored before is unchanged."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        store = copy_store(three, disk / "res")
        before = rows(store)
        filler = fill(disk, leave=40 * 1024)
        argv = ("run", str(three / "five.toml"), "--results", str(disk / "res"), "--quiet")
        code, out, err = finish(cli(*argv))
        line = one_line(err)
        assert code == EXIT_RESOURCE and f"cannot write {store / 'parts'}/" in line and "ENOSPC" in line, line
        assert "(1 from this run)" in line and out.count("] ok") == 1, (line, out)
        check_store(store)
        stored = read_results(store)
        assert len(stored) == 4 and not stored["key"].duplicated().any()

        code, out, err = finish(cli(*argv))  # the part waits for compaction, which needs space
        line = one_line(err)
        assert code == EXIT_RESOURCE and "ENOSPC" in line and "] ok" not in out, (line, out)
        assert len(read_results(store)) == 4

        filler.unlink()
        code, out, err = finish(cli(*argv))
        assert code == 0 and "ran 1 in" in out and "skipped 4" in out, (out, err)
        after = read_results(store)
        assert len(after) == 5 and not after["key"].duplicated().any() and set(after["status"]) == {"ok"}
        assert not (store / "parts").exists() or not any((store / "parts").iterdir())
        now = rows(store)
        kept = now[now["key"].isin(set(before["key"]))].reset_index(drop=True)
        pd.testing.assert_frame_equal(kept[before.columns.intersection(kept.columns)],
                                      before[before.columns.intersection(kept.columns)], check_dtype=False)


@pytest.mark.slow
def test_a_full_disk_during_report_keeps_the_previous_report(tmp_path: Path, three: Path) -> None:
    store = three / "res" / "tiny"
    with tmpfs(tmp_path / "disk", "160k") as disk:
        assert main(["report", str(store), "--out", str(disk / "rep"), *REPORT]) == 0
        previous = digest(disk / "rep")
        fill(disk)
        code, out, err = finish(cli("report", str(store), "--out", str(disk / "rep"), *REPORT))
        line = one_line(err)
        assert code == EXIT_RESOURCE and line.startswith(f"tbptt-bench: error: cannot write {disk / 'rep'}: "
                                                         "no space left on the device (ENOSPC)"), line
        assert digest(disk / "rep") == previous
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "rep"], "no half-built report is left"


@pytest.mark.parametrize("command", ["grad", "train", "bias", "perf"])
def test_save_on_a_full_disk_is_one_line(tmp_path: Path, command: str, capsys: pytest.CaptureFixture) -> None:
    """``--save`` of every command that has one, in-process, on a full tmpfs (or through a write wrapper
    that raises ENOSPC where mounting is not permitted): one line naming the file, status 3, no file left."""
    tiny = ["--task", "adding", "--model", "rnn", "--seq-len", "6", "--batch", "2", "--hidden", "3", "--method", "full"]
    target = {"grad": "g.npz", "train": "t.json", "bias": "b.csv", "perf": "p.csv"}[command]
    extra = {"grad": [], "train": ["--steps", "2", "--eval-every", "1", "--quiet"],
             "bias": ["--batches", "2", "--flips", "2", "--max-lag", "2"],
             "perf": ["--in-process", "--repeats", "1", "--warmup", "0"]}[command]
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(tmpfs(tmp_path / "disk", "64k"))
            fill(folder)
        except pytest.skip.Exception:
            folder = tmp_path
            stack.enter_context(_writes_fail_under(folder))
        code = main([command, *tiny, *extra, "--save", str(folder / target)])
        err = capsys.readouterr().err
        line = one_line("".join(x for x in err.splitlines(True) if not x.endswith(": ok\n")))  # perf's progress
        assert code == EXIT_RESOURCE and line.startswith(f"tbptt-bench: error: cannot write {folder / target}: "
                                                         "no space left on the device (ENOSPC)"), line
        assert sorted(p.name for p in folder.iterdir()) in ([], ["filler"]), "no temporary file is left"


@contextlib.contextmanager
def _writes_fail_under(folder: Path) -> Iterator[None]:
    """Files opened for writing under ``folder`` raise ENOSPC on every write (a stand-in for a full disk)."""
    real_open = io.open

    class Full:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __enter__(self) -> "Full":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.handle.close()

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        under = isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(folder.resolve())
        return Full(handle) if under and any(m in mode for m in "wax") else handle

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("builtins.open", fake_open)
        patch.setattr("io.open", fake_open)
        yield


def test_out_of_memory_past_the_size_check_is_one_line(tmp_path: Path) -> None:
    """A recurrent matrix of 6.4 GB passes the size check (a lower bound against the free memory) but not a
    4 GB address-space limit: the allocation fails inside torch, and the command ends in one line."""
    need = 40000 * 40000 * 4
    if need > MEMORY_SHARE * available_memory():
        pytest.skip("this machine refuses the size before the run; the test needs about 8 GB free")
    limit = 4 * 2**30
    proc = cli("grad", "--task", "adding", "--model", "rnn", "--seq-len", "6", "--batch", "2", "--hidden", "40000",
               "--method", "full", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    code, _, err = finish(proc)
    line = one_line(err)
    assert code == EXIT_RESOURCE and line.startswith("tbptt-bench: error: out of memory (") and \
        f"{need} bytes" in line and line.endswith("; free memory or use smaller sizes"), line


# --------------------------------------------------------------------------- SIGTERM

def terminate(proc: subprocess.Popen, ready: Any, within: float = 240) -> tuple[int, str]:
    """Send SIGTERM to ``proc`` once ``ready()`` is true; its exit status and stderr (its group is killed after)."""
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the moment to send SIGTERM never came"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == EXIT_TERMINATED and one_line(err) == "tbptt-bench: terminated (SIGTERM)", (code, err)
    return code, err


@pytest.mark.slow
def test_sigterm_stops_a_run_like_sigint(tmp_path: Path, three: Path) -> None:
    """SIGTERM while the second of two cells runs: status 143, one line, the first cell committed and
    nothing half-written."""
    store = copy_store(three, tmp_path / "res")
    proc = cli("run", str(three / "five.toml"), "--results", str(tmp_path / "res"), "--quiet")
    terminate(proc, lambda: "] ok" in proc.stdout.readline())
    check_store(store)
    stored = read_results(store)
    assert 4 <= len(stored) <= 5 and not stored["key"].duplicated().any()
    assert not [p for p in store.rglob("*") if "tmp" in p.name or ".trash" in p.name]


@pytest.mark.slow
def test_sigterm_stops_a_report_and_removes_its_building_folder(tmp_path: Path, three: Path) -> None:
    store, out = three / "res" / "tiny", tmp_path / "rep"
    assert main(["report", str(store), "--out", str(out), *REPORT]) == 0
    previous = digest(out)
    proc = cli("report", str(store), "--out", str(out), *REPORT)
    terminate(proc, lambda: any(tmp_path.glob(".rep.building-*/figures/*")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"], "no .rep.building-* or .rep.old-* is left"
    assert digest(out) == previous


# --------------------------------------------------------------------------- one store check

def _truncate(store: Path) -> str:
    path = store / "train.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"results file {path} cannot be read (ArrowInvalid: "


def _unlisted_missing(store: Path) -> str:
    (store / "curves.parquet").unlink()
    return f"store manifest {store / 'manifest.json'} lists the table 'curves' but the store holds no curves.parquet"


def _garbled(store: Path) -> str:
    """Page headers overwritten: the Parquet reader's message has three lines."""
    path = store / "curves.parquet"
    data = bytearray(path.read_bytes())
    data[4:4000] = b"\xff" * 3996
    path.write_bytes(bytes(data))
    return f"results file {path} cannot be read (OSError: Couldn't deserialize thrift"


def _manifest_cut(store: Path) -> str:
    path = store / "manifest.json"
    path.write_text(path.read_text()[:20])
    return f"store manifest {path} is damaged (JSONDecodeError: "


@pytest.mark.parametrize("damage", [_truncate, _unlisted_missing, _garbled, _manifest_cut])
def test_every_reader_refuses_a_damaged_store_with_the_same_line(tmp_path: Path, three: Path, damage: Any,
                                                                  capsys: pytest.CaptureFixture) -> None:
    store = copy_store(three, tmp_path / "res")
    expected = damage(store)
    files = digest(store)
    lines = []
    for argv in (["run", str(three / "three.toml"), "--results", str(tmp_path / "res"), "--list"],
                 ["run", str(three / "five.toml"), "--results", str(tmp_path / "res")],
                 ["report", str(store), "--out", str(tmp_path / "rep")]):
        assert main(argv) == EXIT_USAGE
        lines.append(one_line(capsys.readouterr().err))
    with pytest.raises(UsageError) as info:
        read_results(store)
    lines.append(f"tbptt-bench: error: {' '.join(str(info.value).split())}")
    assert len(set(lines)) == 1 and lines[0].startswith(f"tbptt-bench: error: {expected}"), lines
    assert digest(store) == files, "nothing was modified"


def test_a_read_only_store_is_listed_read_and_run_when_nothing_is_to_do(tmp_path: Path, three: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        store = copy_store(three, disk / "res")
        expected = rows(store)
        read_only(disk)
        results = str(disk / "res")
        assert main(["run", str(three / "three.toml"), "--results", results, "--list"]) == 0
        assert capsys.readouterr().out.count(" ok ") == 3
        assert main(["run", str(three / "three.toml"), "--results", results]) == 0
        assert "skipped 3 (already in the store)" in capsys.readouterr().out
        pd.testing.assert_frame_equal(rows(store), expected)
        assert main(["run", str(three / "five.toml"), "--results", results]) == EXIT_USAGE
        line = one_line(capsys.readouterr().err)
        assert "not writable" in line and "Read-only file system" in line, line


def test_a_store_file_without_read_permission_is_one_line(tmp_path: Path, three: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The Parquet reader refused a file (EACCES; injected, since root reads any file): status 3 and a line
    that names the file and says to make it readable, from every reader."""
    store = copy_store(three, tmp_path / "res")
    real = store_module.pq.read_table

    def read_table(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "train.parquet":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_module.pq, "read_table", read_table)
    expected = (f"tbptt-bench: error: cannot read {store / 'train.parquet'}: permission denied (EACCES); "
                "make it readable and run the command again")
    for argv in (["run", str(three / "three.toml"), "--results", str(tmp_path / "res"), "--list"],
                 ["report", str(store), "--out", str(tmp_path / "rep")]):
        assert main(argv) == EXIT_RESOURCE
        assert one_line(capsys.readouterr().err) == expected


@pytest.mark.slow
def test_a_read_only_store_is_reported_from(tmp_path: Path, three: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        store = copy_store(three, disk / "res")
        read_only(disk)
        code, out, err = finish(cli("report", str(store), "--out", str(tmp_path / "rep"), *REPORT))
        assert code == 0 and (tmp_path / "rep" / "report.md").is_file(), err
