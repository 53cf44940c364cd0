"""The ``tbptt-bench`` command line. Each sub-command lives in ``tbptt_bench.commands.<name>``.

Bad input (a UsageError, an argument the parser rejects, a size that cannot be allocated) prints one
line ``tbptt-bench[ CMD]: error: ...`` on stderr and exits with status 2 (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from tbptt_bench.errors import UsageError
from tbptt_bench.registry import add_plugin_dirs
from tbptt_bench.validation import is_allocation_failure

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argument error (2)
        return exc.code if isinstance(exc.code, int) else 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.plugins:
            add_plugin_dirs(args.plugins)
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"tbptt-bench: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        print(f"tbptt-bench: error: not enough memory ({' '.join(str(exc).split())[:160]}); use smaller sizes",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tbptt-bench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
