"""Options declared once: a dataclass field says its flag, help, accepted values and bounds.

A command's options are the fields of one dataclass (``RunConfig``, ``TrainConfig``, ``PerfConfig``,
``BiasOptions``...), each declared with :func:`option`. From that one declaration

* :func:`add_arguments` adds the command-line flags (default: the field's default),
* :func:`from_args` turns the parsed flags into field values, every value checked against its bounds,
* :func:`schema` gives a suite's accepted keys with their types and defaults, and :meth:`Option.read`
  reads a suite's value: of the field's type (:func:`coerce`), within the same bounds and accepted values,

so a default, a bound or a list of accepted values cannot differ between the command line, a suite
file and the API. Pure: no torch, pandas or scipy (the CLI builds its parser from these declarations).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from tbptt_bench.errors import UsageError
from tbptt_bench.validation import finite_float, integer

#: The key of a field's :class:`Flag` in its dataclass metadata.
METADATA_KEY = "tbptt_bench.option"
#: The default of a field that has none (a suite must give it; the command line builds it otherwise).
REQUIRED = object()
#: The largest count (steps, batches, resamples, repeats...) any option accepts: a documented cap, so that
#: a count typed by mistake (10**20) is an error instead of a run that never ends (docs/reliability.md).
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line and which values it accepts."""

    help: str
    #: The flag (``--batches``); None: the field is not a command-line option.
    flag: str | None = None
    #: Further spellings of the flag (``--clip`` for ``--clip-norm``).
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    #: The accepted values (checked on the command line and in suites).
    choices: tuple[Any, ...] | None = None
    #: Bounds of a number: ``lo ≤ value ≤ hi`` (``lo < value`` with ``lo_open``).
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    #: ``append``: a repeatable flag whose items ``parse`` turns into the value; ``store_true``/``store_false``
    #: for a switch.
    action: str | None = None
    #: Turns what the parser read (the text, or the list of an ``append`` flag) into the field's value.
    parse: Callable[[str, Any], Any] | None = None


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
           factory: Callable[[], Any] | None = None, **declared: Any) -> Any:
    """A dataclass field with its :class:`Flag` (``flag`` None: not on the command line)."""
    metadata = {METADATA_KEY: Flag(help=help, flag=flag, **declared)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One option of a command: its field's name, type hint and default, and its declaration."""

    name: str
    hint: Any
    default: Any
    flag: Flag

    @property
    def spelled(self) -> str:
        """The name a user wrote: the flag, else the field's name."""
        return self.flag.flag or self.name

    def read(self, value: Any, where: str) -> Any:
        """A suite's value for this option: of the field's type (:func:`coerce`) and within its declaration
        (:meth:`check`); errors name ``where`` (the file and block) and the key."""
        return self.check(coerce(value, self.hint, f"{where}: {self.name}"), where)

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` within the declared bounds and choices (None passes where the hint allows it); an error
        names the flag, or the key after ``where`` (a suite block)."""
        name = f"{where}: {self.name}" if where else self.spelled
        if value is None:
            return value
        f = self.flag
        if f.choices is not None and value not in f.choices:
            prefix = f"{where}: " if where else ""
            raise UsageError(f"{prefix}unknown {self.name if where else self.spelled} {value!r}; accepted: "
                             f"{', '.join(map(str, f.choices))}")
        if f.lo is None and f.hi is None or isinstance(value, (list, dict, str)):
            return value
        if _base(self.hint) is int:
            hi = None if f.hi is None else int(f.hi)
            return integer(name, value, lo=None if f.lo is None else int(f.lo) + (1 if f.lo_open else 0), hi=hi)
        return finite_float(name, value, f.lo, f.hi, lo_open=f.lo_open, hi_open=f.hi_open)


def coerce(value: Any, hint: Any, what: str) -> Any:
    """``value`` checked against a type hint; ints widen to floats, ``"none"`` is None where allowed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value == "none"):
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, what)
            except UsageError:
                continue
        raise UsageError(f"{what} = {value!r} must be {_describe(hint)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"{what} = {value!r} must be one of {', '.join(map(repr, args))}")
    base = origin or hint
    ok = True
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = finite_float(what, value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif base in (list, tuple, typing.Sequence):
        ok = isinstance(value, list)
        if ok and args:
            value = [coerce(v, args[0], what) for v in value]
    elif base is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise UsageError(f"{what} = {value!r} must be {_describe(hint)}")
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append('"none"')
        return " or ".join(parts)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "a list"}
    return names.get(origin or hint, str(hint))


def _base(hint: Any) -> Any:
    """``int`` for ``int | None``, the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def declared(cls: type, *, skip: Collection[str] = (), only: Collection[str] | None = None,
             defaults: Mapping[str, Any] | None = None) -> dict[str, Option]:
    """The options of dataclass ``cls`` in field order, those in ``skip`` left out (or only those in ``only``),
    with ``defaults`` replacing the fields' own. Every field taken must be declared with :func:`option`
    (TypeError otherwise: an undeclared field would be a suite key nobody checks)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Option] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = f.metadata.get(METADATA_KEY)
        if flag is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no declaration; declare it with tbptt_bench.options.option")
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = REQUIRED
        out[f.name] = Option(f.name, hints[f.name], default, flag)
    return out


def schema(options: Mapping[str, Option], skip: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Name → (type hint, default) of a suite's keys, :data:`REQUIRED` for a key without a default."""
    return {name: (o.hint, o.default) for name, o in options.items() if name not in skip}


def add_arguments(parser: argparse.ArgumentParser, options: Mapping[str, Option], *,
                  grid: Collection[str] = ()) -> None:
    """Add a flag per option that has one (dest: the field's name, default: the field's default).

    Options named in ``grid`` take a list (comma-separated or repeated, e.g. ``--seq-len 256,1024``).
    """
    for name, o in options.items():
        f = o.flag
        if f.flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": name, "help": _help(o, name in grid)}
        if f.action not in ("store_true", "store_false"):
            kwargs["metavar"] = f.metavar or f.flag.lstrip("-").upper().replace("-", "_")
        if name in grid or f.action == "append":
            kwargs.update(action="append", default=[])
        elif f.action in ("store_true", "store_false"):
            kwargs.update(action=f.action, default=o.default)
        else:
            kwargs["default"] = None if o.default is REQUIRED else o.default
            kind = _base(o.hint)
            if kind in (int, float) and f.parse is None:  # a parse function reads the text itself
                kwargs["type"] = kind
            if f.choices is not None:
                kwargs["choices"] = list(f.choices)
        parser.add_argument(f.flag, *f.aliases, **kwargs)


def _help(o: Option, listed: bool) -> str:
    """The flag's help (``--help`` adds the default); a switch says that it is off by default."""
    text = o.flag.help + (f"; comma-separated or repeated for a grid (default: {o.default})" if listed else "")
    if o.flag.action in ("store_true", "store_false"):
        text += " (off by default)"
    return text.replace("%", "%%")


def from_args(args: argparse.Namespace, options: Mapping[str, Option]) -> dict[str, Any]:
    """The field values the parsed flags give (options without a flag left out), each checked."""
    out: dict[str, Any] = {}
    for name, o in options.items():
        if o.flag.flag is None or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if o.flag.parse is not None:
            value = o.flag.parse(o.flag.flag, value)
        out[name] = o.check(value)
    return out


def grid_values(args: argparse.Namespace, o: Option, split: Callable[[str], list[str]]) -> list[Any]:
    """The values of a grid flag (``--seq-len 256,1024``): each item converted to the field's type and
    checked; the field's default alone when the flag is not given."""
    items = [item for text in getattr(args, o.name) for item in split(text)]
    if not items:
        return [o.default]
    kind = _base(o.hint)
    out = []
    for item in items:
        value: Any = item.strip()
        if not value:
            raise UsageError(f"{o.spelled} {', '.join(getattr(args, o.name))!r} has an empty item; "
                             "write the values separated by single commas, e.g. 256,1024")
        if kind is int:
            try:
                value = o.check(integer(o.spelled, value, lo=None))
            except UsageError:
                raise UsageError(f"{o.spelled} takes integers ≥ {o.flag.lo or 0:g} separated by commas, e.g. 256,1024; "
                                 f"got {item!r}") from None
        out.append(o.check(value))
    return out


def key_values(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; numbers become int or float (non-finite ones are refused by the task)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"malformed {option} {item!r}; expected KEY=VALUE")
        out[key] = _number(value)
    return out


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
