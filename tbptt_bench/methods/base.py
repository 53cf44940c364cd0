"""Gradient methods as specs: a small string grammar mapped onto the truncation mask.

Grammar: ``FAMILY[:KEY=VALUE[,KEY=VALUE]...]``, e.g. ``full``, ``full:checkpoint=64``,
``tbptt:k1=8,k2=16``, ``chunked:k=16``, ``sliding:k=16``. Values are integers, floats or words. Every family
turns a sequence length into a list of :class:`~tbptt_bench.core.mask.Update` (docs/design.md §2); the engine
runs those updates and knows nothing else about methods.

The families live in their own modules (``truncation``, ``hybrid``, ``randomised``, ``schedules``,
``adaptive``) and register on import of :mod:`tbptt_bench.methods`.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.registry import Registry
from tbptt_bench.validation import finite_float, integer

if TYPE_CHECKING:
    from torch import nn

    from tbptt_bench.core.engine import Source
    from tbptt_bench.models.protocol import State


@dataclass(frozen=True)
class Param:
    """A method parameter: its type, default (``None`` = required) and what it must satisfy."""

    kind: type
    default: Any = None
    check: Callable[[Any], bool] = lambda v: True
    rule: str = ""
    required: bool = True


def positive_int(default: int | None = None, required: bool = True) -> Param:
    return Param(int, default, lambda v: v >= 1, "an integer ≥ 1", required)


class Method(ABC):
    """A gradient method: named parameters and the updates it makes over a sequence."""

    family: ClassVar[str]
    summary: ClassVar[str]
    schema: ClassVar[dict[str, Param]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = validate(self.family, self.schema, params)

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    @property
    def spec(self) -> str:
        """The canonical spec string (parameters in schema order, defaults included)."""
        items = [f"{k}={self.params[k]}" for k in self.schema if self.params.get(k) is not None]
        return self.family + (":" + ",".join(items) if items else "")

    @property
    def checkpoint(self) -> int | None:
        """Chunk length for activation checkpointing in the backward pass, or None."""
        return None

    @abstractmethod
    def updates(self, length: int, first_update: int = 0, rng: np.random.Generator | None = None) -> list[Update]:
        """The updates over a sequence of ``length`` steps; ``first_update`` counts earlier updates."""

    def observe(self, update: int, model: nn.Module, source: Source, state: State, loss_kind: str) -> None:
        """Called before each sequence or stream segment with the current θ, the segment and its initial
        state, ``update`` updates into training. Stateful methods (adaptive K) re-estimate here."""

    def k_used(self, update: int) -> int | None:
        """The truncation length K the method uses at 0-based global update ``update`` (None: no single K)."""
        return None

    def __repr__(self) -> str:
        return f"Method({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method family available in specs under ``cls.family``."""
    METHODS.register(cls.family, cls)
    return cls


def validate(family: str, schema: dict[str, Param], params: dict[str, Any]) -> dict[str, Any]:
    """Check names, types and rules of method parameters; fill defaults."""
    unknown = sorted(set(params) - set(schema))
    if unknown:
        accepted = ", ".join(schema) or "none"
        raise UsageError(f"method {family!r} has no parameter {unknown[0]!r}; accepted: {accepted}")
    out: dict[str, Any] = {}
    for name, p in schema.items():
        if name not in params or params[name] is None:
            if p.required and p.default is None:
                raise UsageError(f"method {family!r} needs {name}= ({p.rule}), e.g. {family}:{name}=16")
            out[name] = p.default
            continue
        value = params[name]
        try:
            if p.kind is int:
                value = integer(name, value, lo=None)
            elif p.kind is float:
                value = finite_float(name, value)
            else:
                value = p.kind(value)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"method {family!r}: {name}={params[name]!r} must be {p.rule}") from None
        if not p.check(value):
            raise UsageError(f"method {family!r}: {name}={value} must be {p.rule}")
        out[name] = value
    return out


_SPEC = re.compile(r"^\s*([a-z][a-z0-9_\-]*)\s*(?::(.*))?$")


def parse_method(spec: str | Method) -> Method:
    """Parse ``FAMILY[:KEY=VALUE,...]`` into a :class:`Method`; a UsageError says what is accepted."""
    if isinstance(spec, Method):
        return spec
    match = _SPEC.match(spec or "")
    if not match:
        raise UsageError(
            f"malformed method spec {spec!r}; expected FAMILY[:KEY=VALUE,...], e.g. tbptt:k1=8,k2=16"
        )
    family, rest = match.group(1), match.group(2)
    cls = METHODS.get(family)
    params: dict[str, Any] = {}
    if rest is not None and rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UsageError(f"malformed parameter {item!r} in method spec {spec!r}; expected KEY=VALUE")
            if key in params:
                raise UsageError(f"parameter {key!r} given twice in method spec {spec!r}")
            params[key] = _number(value, spec)
    return cls(**params)


def _number(text: str, spec: str) -> int | float | str:
    """A spec value as int, float or word; a number that is not finite (inf, nan, 1e400) is a UsageError."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"method spec {spec!r}: {text} is not a finite number; give a finite value")
        return value
    return text
