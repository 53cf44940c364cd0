"""The ``tbptt-bench`` command line. Each sub-command lives in ``tbptt_bench.commands.<name>``.

Every way a command can end early is one line on stderr and an exit status of its own
(docs/reliability.md): bad input (a UsageError, an argument the parser rejects, a size that cannot be
allocated) ``tbptt-bench[ CMD]: error: ...`` and 2; no space left, out of memory or permission refused
while working ``tbptt-bench: error: cannot write PATH: ...`` and 3; SIGINT 130 and SIGTERM 143, both
raised as an interruption in the main thread so that temporary files and folders are removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Iterator, NoReturn

from tbptt_bench.errors import (EXIT_INTERRUPTED, EXIT_RESOURCE, EXIT_TERMINATED, EXIT_USAGE, ResourceError,
                                Terminated, UsageError, resource_cause)
from tbptt_bench.registry import add_plugin_dirs

COMMANDS = ("tasks", "explain", "grad", "train", "bias", "perf", "run", "report")


def _available_commands() -> list[object]:
    modules = []
    for name in COMMANDS:
        try:
            modules.append(importlib.import_module(f"tbptt_bench.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"tbptt_bench.commands.{name}":
                raise
    return modules


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, unless the help text already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or action.default == []:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``tbptt-bench CMD: error: ...``, and exit status 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        first = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {first}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tbptt-bench",
        description="Gradient bias, cost and learning outcomes of truncated backpropagation through time.",
    )
    parser.add_argument("--plugins", action="append", default=[], metavar="DIR",
                        help="folder of user tasks/models/methods (*.py files), repeatable")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _available_commands():
        module.add_parser(sub)  # type: ignore[attr-defined]
    for command in sub.choices.values():  # every flag's --help shows its default
        command.formatter_class = DefaultsFormatter
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`~tbptt_bench.errors.Terminated` in the main thread (as SIGINT
    raises KeyboardInterrupt); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(text: str, status: int) -> int:
    """Print ``tbptt-bench: TEXT`` as one line (a library's message may carry newlines); return ``status``."""
    print("tbptt-bench: " + " ".join(text.split()), file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argument error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    with sigterm_as_interrupt():
        try:
            if args.plugins:
                add_plugin_dirs(args.plugins)
            return int(args.run(args) or 0)
        except UsageError as exc:
            return _error(f"error: {exc}", EXIT_USAGE)
        except ResourceError as exc:
            return _error(f"error: {exc}", EXIT_RESOURCE)
        except Terminated:
            return _error("terminated (SIGTERM)", EXIT_TERMINATED)
        except KeyboardInterrupt:
            return _error("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        except Exception as exc:  # no space, memory or permission where no path was attached
            cause = resource_cause(exc)
            if cause is None:
                raise
            return _error(f"error: {ResourceError(getattr(cause, 'filename', None), cause)}", EXIT_RESOURCE)


if __name__ == "__main__":
    sys.exit(main())
