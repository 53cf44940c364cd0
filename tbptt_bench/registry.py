"""The registry type behind tasks, models and methods, and discovery of user plugins.

Each sub-package holds its own registry (``tasks.TASKS``, ``models.MODELS``, ``methods.METHODS``) and
its built-ins register when the sub-package is imported. Users add a task or a model without editing the package:

* a Python file (or several) in a folder they name with ``--plugins DIR`` or the environment variable
  ``TBPTT_BENCH_PLUGINS`` (``os.pathsep``-separated folders); every ``*.py`` file there is imported and
  may call :func:`register_task` / :func:`register_model`;
* an installed distribution that declares an entry point in the group ``tbptt_bench.plugins``; the
  entry point's target is imported (and called if it is a function).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from tbptt_bench.errors import UsageError
from tbptt_bench.validation import identifier

log = logging.getLogger(__name__)

T = TypeVar("T")

ENTRY_POINT_GROUP = "tbptt_bench.plugins"
PLUGIN_ENV = "TBPTT_BENCH_PLUGINS"


class Registry(Generic[T]):
    """A name → object table with errors that list what is accepted."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name`` (a non-empty identifier-like string); a clash needs ``replace``."""
        identifier(f"{self.kind} name", name)
        if not replace and name in self._items and self._items[name] is not item:
            raise UsageError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


_loaded_dirs: set[Path] = set()
_entry_points_loaded = False


def add_plugin_dirs(dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Import every ``*.py`` file in each folder (once per folder)."""
    for d in dirs:
        path = Path(d).expanduser().resolve()
        if path in _loaded_dirs:
            continue
        if not path.is_dir():
            raise UsageError(f"plugin folder {str(d)!r} does not exist or is not a folder")
        _loaded_dirs.add(path)
        for file in sorted(path.glob("*.py")):
            module_name = f"tbptt_bench_plugin_{abs(hash(str(file)))}_{file.stem}"
            spec = importlib.util.spec_from_file_location(module_name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except UsageError:
                raise
            except Exception as exc:  # a broken plugin is the user's bug: say which file
                raise UsageError(f"plugin {file} failed to import: {type(exc).__name__}: {exc}") from exc
            log.debug("loaded plugin %s", file)


def load_plugins() -> None:
    """Load entry-point plugins and the folders named in ``TBPTT_BENCH_PLUGINS`` (built-ins register
    when their sub-package is imported)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            target = ep.load()
            if callable(target) and not isinstance(target, type):
                target()
    env = os.environ.get(PLUGIN_ENV)
    if env:
        add_plugin_dirs(p for p in env.split(os.pathsep) if p)
