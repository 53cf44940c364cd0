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
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

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


#: ``Method.k_param`` default: the parameter ``k``, else ``k1``, if the schema has it (plugin families).
AUTO = "*"


class Method(ABC):
    """A gradient method: named parameters, the updates it makes over a sequence, and how it describes
    itself to analyses and reports (its K axis, grid rule, series, label, order; docs/design.md §2).

    Every description has a default, so a plugin family needs to declare only what differs.
    """

    family: ClassVar[str]
    summary: ClassVar[str]
    schema: ClassVar[dict[str, Param]] = {}
    #: The parameter that is the truncation length K (None: no K axis; AUTO: ``k``, else ``k1``).
    k_param: ClassVar[str | None] = AUTO
    #: Where the family sorts among others in tables and legends (lower first; ties by series, K, spec).
    rank: ClassVar[int] = 50
    #: Whether the estimate at frozen θ is a fixed function of the data (False: it draws random numbers).
    deterministic: ClassVar[bool] = True
    #: Whether the truncation length is the same at every update (False: it changes over updates or training).
    constant_k: ClassVar[bool] = True
    #: Whether the estimate is the true gradient itself (full BPTT: the reference every method is compared with).
    exact: ClassVar[bool] = False
    #: True for methods that compute ĝ by forward-mode accumulation instead of a mask (docs/design.md §7.3).
    forward_mode: ClassVar[bool] = False

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

    def expected_mask(self, length: int) -> np.ndarray | None:
        """``E M[t, s]`` over the method's random draws, exactly, or None when the family cannot say.

        A family whose mask weights are random declares it here (ARTBP does); a deterministic method's
        expectation is its own estimate, so it needs nothing. :meth:`expected_updates` runs it.
        """
        return None

    def expected_updates(self, length: int) -> list[Update] | None:
        """Updates whose summed gradient is ``E ĝ`` over the draws (realising :meth:`expected_mask`
        with :func:`expectation_updates`), or None when there is no exact expectation."""
        if self.deterministic:
            return self.updates(length)
        mask = self.expected_mask(length)
        if mask is None:
            return None
        return expectation_updates(mask)

    def observe(self, update: int, model: nn.Module, source: Source, state: State, loss_kind: str) -> None:
        """Called before each sequence or stream segment with the current θ, the segment and its initial
        state, ``update`` updates into training. Stateful methods (adaptive K) re-estimate here."""

    def k_used(self, update: int) -> int | None:
        """The truncation length K the method uses at 0-based global update ``update`` (None: no single K)."""
        return None

    # -- self-description (docs/design.md §2) --------------------------------------------------------

    @classmethod
    def k_name(cls) -> str | None:
        """The name of the family's truncation-length parameter, or None when it has no K axis."""
        if cls.k_param != AUTO:
            return cls.k_param
        return next((n for n in ("k", "k1") if n in cls.schema and cls.schema[n].kind is int), None)

    @classmethod
    def at_k(cls, k: int) -> Method:
        """The family's method at truncation length ``k`` in a K grid: the K parameter set to ``k``.

        UsageError when the family has no K axis or needs other parameters as well.
        """
        name = cls.k_name()
        if name is None:
            raise UsageError(f"method family {cls.family!r} has no K parameter; give complete specs instead, "
                             f"e.g. {cls.family}:KEY=VALUE")
        others = [n for n, p in cls.schema.items() if n != name and p.required and p.default is None]
        if others:
            raise UsageError(f"method family {cls.family!r} also needs {', '.join(others)} for a K grid; give "
                             f"complete specs instead, e.g. {cls.family}:{name}=8,{others[0]}=...")
        return cls(**{name: k})

    @classmethod
    def taken_once(cls) -> bool:
        """Whether a K grid takes the bare family once, as is (no K axis and nothing required, e.g. ``full``)."""
        return cls.k_name() is None and not any(p.required and p.default is None for p in cls.schema.values())

    @property
    def grid_k(self) -> int | None:
        """This method's truncation length K on the family's K axis (None: no K axis)."""
        name = self.k_name()
        value = self.params.get(name) if name is not None else None
        return int(value) if value is not None else None

    @property
    def series(self) -> str:
        """The family curve this method lies on in plots against K: the family and its parameters other than K."""
        name = self.k_name()
        if name is None:
            return self.spec
        rest = [f"{k}={v}" for k, v in self.params.items() if k != name and v is not None]
        return self.family + (f" ({', '.join(rest)})" if rest else "")

    @property
    def label(self) -> str:
        """A short display label, e.g. ``chunked K=8``."""
        k = self.grid_k
        return self.spec if k is None else f"{self.series} K={k}"

    @property
    def fixed_lags(self) -> int | None:
        """L when every loss keeps exactly its last L lags (its estimate is one lag decomposition's
        ĝ_L, and an analysis profiles at least L lags by default); None otherwise."""
        return None

    @property
    def fixed_k(self) -> bool:
        """Whether the method truncates at one K throughout (it has a K axis and K never changes)."""
        return self.constant_k and self.k_name() is not None

    @property
    def sort_key(self) -> tuple[int, str, int, str]:
        """Order in tables and legends: family rank, series, K (-1 without K), spec."""
        k = self.grid_k
        return self.rank, self.series, -1 if k is None else k, self.spec

    def describe(self) -> dict[str, Any]:
        """The columns that identify this method in a result table: family, spec, series, k, label."""
        return {"family": self.family, "spec": self.spec, "series": self.series, "k": self.grid_k,
                "label": self.label}

    def __repr__(self) -> str:
        return f"Method({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def expectation_updates(mask: np.ndarray, rtol: float = 1e-12) -> list[Update]:
    """Updates realising ``mask`` (lower-triangular, positive on and below the diagonal, ones on it): each
    update a run of consecutive losses whose rows share the per-position factors ``W[t, p-1] / W[t, p]``.

    Any such row is a product of its own factors, so one update per loss always works; consecutive losses
    are merged while their factors agree (an unbiased method's expectation, all ones, is one update).
    """
    m = np.asarray(mask, dtype=np.float64)
    length = m.shape[0]
    if m.shape != (length, length):
        raise UsageError(f"an expected mask must be a square T×T matrix, got shape {m.shape}")
    lower = m[np.tril_indices(length)]
    if length and (lower.min() <= 0 or np.abs(np.diag(m) - 1.0).max() > 1e-12):
        raise UsageError(f"an expected mask must be positive on and below the diagonal with ones on it; got "
                         f"smallest entry {lower.min():g}, diagonal within {np.abs(np.diag(m) - 1.0).max():g} of 1")
    factors = np.ones((length, length))  # factors[t, p] = W[t, p-1] / W[t, p] for 1 ≤ p ≤ t
    for t in range(1, length):
        factors[t, 1 : t + 1] = m[t, :t] / m[t, 1 : t + 1]
    out: list[Update] = []
    start = 0
    for t in range(1, length + 1):
        if t < length and np.allclose(factors[t, 1:t], factors[t - 1, 1:t], rtol=rtol, atol=0.0):
            continue  # loss t shares the factors of the losses before it: same update
        last = factors[t - 1]
        out.append(Update(start, t, 0, None, tuple((p, float(last[p])) for p in range(1, t) if last[p] != 1.0)))
        start = t
    return out


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


_SPEC_START = re.compile(r"^[a-z][a-z0-9_\-]*(:|$)")


def split_specs(text: str) -> list[str]:
    """Split ``"chunked:k=8,tbptt:k1=4,k2=8,full"`` into method specs.

    A comma-separated piece ``KEY=VALUE`` (no ``:`` before its ``=``) continues the spec before it; any
    other piece starts a new spec. Empty pieces are an error (a stray comma usually hides a typo).
    """
    out: list[str] = []
    for piece in (p.strip() for p in str(text).split(",")):
        if not piece:
            raise UsageError(f"empty method spec in {text!r}; expected specs separated by single commas, "
                             "e.g. chunked:k=8,full")
        key, sep, _ = piece.partition("=")
        if sep and ":" not in key:
            if not out:
                raise UsageError(f"malformed method list {text!r}: {piece!r} belongs to no method; "
                                 "expected FAMILY[:KEY=VALUE,...] first")
            out[-1] += "," + piece
        elif _SPEC_START.match(piece):
            out.append(piece)
        else:
            raise UsageError(f"malformed method list {text!r}: cannot read {piece!r}; expected FAMILY[:KEY=VALUE,...]")
    return out


def describe(spec: str | Method) -> dict[str, Any]:
    """:meth:`Method.describe` of a spec, plus ``fixed_k``, ``exact`` and ``sort_key``; a spec that does not parse (e.g. a plugin
    family not loaded) is its own series and label, without K, sorted last."""
    try:
        method = parse_method(spec)
    except UsageError:
        text = str(spec)
        return {"family": "", "spec": text, "series": text, "k": None, "label": text, "fixed_k": False,
                "exact": False, "sort_key": (Method.rank + 1, text, -1, text)}
    return {**method.describe(), "fixed_k": method.fixed_k, "exact": method.exact, "sort_key": method.sort_key}


def order_specs(specs: Iterable[str]) -> list[str]:
    """Distinct specs in the methods' own order (:attr:`Method.sort_key`)."""
    return sorted(dict.fromkeys(str(s) for s in specs), key=lambda s: describe(s)["sort_key"])


def grid(families: Sequence[str], ks: Sequence[int]) -> list[Method]:
    """Methods for every family and K, by each family's own grid rule (:meth:`Method.at_k`): e.g.
    ``chunked:k=K``, ``sliding:k=K``, ``tbptt:k1=K,k2=2K-1`` (docs/design.md §3).

    A complete spec, or a bare family with no K axis and nothing required (``full``), is taken once, as is.
    """
    out: list[Method] = []
    for item in families:
        cls = METHODS.get(item) if item in METHODS else None
        if cls is None or cls.taken_once():
            out.append(parse_method(item))
            continue
        if not ks:
            raise UsageError(f"method family {item!r} needs a K grid (--k 1,2,4,...) or a complete spec like "
                             f"{item}:k=8")
        out.extend(cls.at_k(k) for k in ks)
    return list(dict.fromkeys(out))
