"""One run configuration, built in one place: task, model, method, optimiser, schedule and engine.

:class:`RunConfig` holds what training, cost measurement and suites share (plain values, so it can be
hashed and stored); :func:`build_run` turns it into a :class:`Run`, the objects every consumer uses.
Training (:class:`tbptt_bench.training.loop.TrainConfig`) and cost measurement
(:class:`tbptt_bench.perf.config.PerfConfig`) hold a ``RunConfig`` and add only their own fields
(:class:`ComposedConfig`).

The optimiser is any ``torch.optim`` optimiser by name (case-insensitive) with its keyword arguments,
``none`` for θ fixed (the cost of a gradient estimate ĝ); the learning-rate schedule any
``torch.optim.lr_scheduler`` scheduler by name, stepped after every update (docs/design.md §2.3: the
optimiser steps after each update); gradient clipping is by the global norm over all parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tbptt_bench.core.build import make_model, make_task, resolve_device, resolve_dtype
from tbptt_bench.core.engine import Engine
from tbptt_bench.core.forward_mode import OnlineEngine
from tbptt_bench.errors import UsageError
from tbptt_bench.options import MAX_COUNT, Option, declared, key_values, option, schema
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.seeding import derive_seed
from tbptt_bench.tasks.base import Task
from tbptt_bench.validation import finite_float

#: The optimiser name meaning "no optimiser": θ stays fixed.
NO_OPTIMIZER = "none"


def _classes(module: Any, base: type) -> dict[str, type]:
    """Public subclasses of ``base`` in ``module``, by lower-case name."""
    out = {}
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base and not name.startswith("_"):
            out[name.lower()] = obj
    return out


def _needs_argument(step: Any) -> str | None:
    """The first parameter of ``step`` (besides self) that has no default, if any."""
    params = list(inspect.signature(step).parameters.values())[1:]
    return next((p.name for p in params if p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)), None)


def _by_name(module: Any, base: type, name: str, what: str, unusable: str, extra: str = "") -> type[Any]:
    """The class of ``module`` derived from ``base`` called ``name`` (any case) whose ``step`` takes no
    argument; UsageError says why another known class is refused (``unusable``) and lists the accepted."""
    known = _classes(module, base)
    usable = {k: v for k, v in known.items() if _needs_argument(v.step) is None}
    cls = usable.get(name.lower())
    if cls is None:
        why = unusable if name.lower() in known else ""
        raise UsageError(f"unknown {what} {name!r}; {why}accepted: {extra}"
                         f"{', '.join(sorted(v.__name__ for v in usable.values()))}")
    return cls


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` optimiser called ``name`` (any case); UsageError lists the accepted names."""
    return _by_name(torch.optim, torch.optim.Optimizer, name, "optimizer", "its step needs a closure; ",
                    f"{NO_OPTIMIZER}, ")


def scheduler_class(name: str) -> type[Any]:
    """The ``torch.optim.lr_scheduler`` scheduler called ``name``; it must step without arguments."""
    return _by_name(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler, name, "lr_schedule",
                    "it steps on a metric, not per update; ")


PATHS = ("fused", "cell")
#: Dtypes a run can compute in.
DTYPES = ("float32", "float64")
#: The largest seed (numpy and torch take seeds below 2**63).
MAX_SEED = 2**63 - 1


def _key_values(flag: str, items: list[str]) -> dict[str, Any]:
    """``--task-param KEY=VALUE`` items as a dict."""
    return key_values(items, flag)


def _clip(flag: str, value: Any) -> float | None:
    """``--clip-norm`` as a norm, 0 (or none given) for no clipping."""
    return None if value is None else finite_float(flag, value, 0) or None


def _kwargs(flag: str, text: str | None) -> dict[str, Any] | None:
    """``--optimizer-args`` text as keyword arguments (None for none)."""
    return parse_kwargs(text, flag) or None if text is not None else None


@dataclass
class RunConfig:
    """What defines a run of a method on a task and model (plain values; defaults are training's).

    Each field is declared once (:func:`tbptt_bench.options.option`): its flag on the command line, its
    help, accepted values and bounds; commands and suites derive their options from these declarations.
    """

    task: str = option("copy", flag="--task", help="task name (see `tbptt-bench tasks`)")
    task_params: dict[str, Any] = option(
        factory=dict, flag="--task-param", action="append", metavar="KEY=VALUE", parse=_key_values,
        help="task constructor parameter, repeatable (e.g. --task-param corpus=text --task-param path=f.txt)")
    model: str = option("lstm", flag="--model", help="model name (see `tbptt-bench tasks`)")
    #: Keyword arguments of the model's factory (e.g. ``{"mem": 16}`` for ``sab``); {} for its defaults.
    model_params: dict[str, Any] = option(
        factory=dict, flag="--model-param", action="append", metavar="KEY=VALUE", parse=_key_values,
        help="model factory parameter, repeatable (e.g. --model-param mem=16 for sab)")
    hidden_size: int = option(32, flag="--hidden", lo=1, help="hidden size")
    num_layers: int = option(1, flag="--layers", lo=1, help="number of recurrent layers")
    path: str = option("fused", flag="--path", choices=PATHS, help="execution path of built-in models")
    method: str = option("chunked:k=16", flag="--method", help="method spec")
    seq_len: int = option(64, flag="--seq-len", lo=1, help="sequence (or stream segment) length T")
    batch_size: int = option(16, flag="--batch", lo=1, help="batch size B")
    dtype: str = option("float32", flag="--dtype", choices=DTYPES, help="dtype of parameters and data")
    device: str = option("cpu", flag="--device", help="cpu, cuda, cuda:N or auto")
    seed: int = option(0, flag="--seed", lo=0, hi=MAX_SEED, help="seed for parameters and data")
    #: torch threads; None leaves them as they are (perf: every CPU the process may use).
    threads: int | None = option(None, flag="--threads", lo=1, hi=MAX_COUNT,
                                 help="torch threads (default: as torch sets them; perf: every CPU available; 1 on a busy machine is "
                                      "often much faster)")
    #: A ``torch.optim`` optimiser name (any case), or ``none`` (θ fixed).
    optimizer: str = option("adam", flag="--optimizer",
                            help="any torch.optim optimiser by name, any case (adam, sgd, adamw, rmsprop, …), or "
                                 "none (θ fixed: the cost of gradient estimates)")
    lr: float = option(1e-3, flag="--lr", lo=0, lo_open=True, help="learning rate")
    #: Further keyword arguments of the optimiser (``lr`` is its own field); None for none.
    optimizer_args: dict[str, Any] | None = option(
        None, flag="--optimizer-args", metavar="JSON|K=V,...", parse=_kwargs,
        help='its keyword arguments besides lr, e.g. momentum=0.9,nesterov=true or {"betas": [0.9, 0.99]}')
    #: A ``torch.optim.lr_scheduler`` name, stepped after every update; None for a constant rate.
    lr_schedule: str | None = option(
        None, flag="--lr-schedule", metavar="NAME",
        help="a torch.optim.lr_scheduler scheduler by name, stepped after every update (e.g. StepLR)")
    lr_schedule_args: dict[str, Any] | None = option(
        None, flag="--lr-schedule-args", metavar="JSON|K=V,...", parse=_kwargs,
        help="its keyword arguments, e.g. step_size=100,gamma=0.5")
    #: Gradient clipping by global norm before each optimiser step; None for none.
    clip: float | None = option(1.0, flag="--clip-norm", aliases=("--clip",), lo=0, parse=_clip,
                                help="clip gradients to this global norm before each step (0 disables)")

    def validate(self) -> None:
        """Raise UsageError, saying what is accepted, for a value no run can use."""
        for name in ("seq_len", "batch_size", "hidden_size", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be ≥ 1 (or none), got {self.threads}")
        if self.path not in PATHS:
            raise UsageError(f"unknown path {self.path!r}; accepted: {', '.join(PATHS)}")
        if not self.lr > 0:
            raise UsageError(f"learning rate must be > 0, got {self.lr}")
        if self.clip is not None and not self.clip > 0:
            raise UsageError(f"gradient clip must be > 0 (or none), got {self.clip}")
        resolve_dtype(self.dtype)
        self._check_model_params()
        parse_method(self.method)
        probe = nn.Parameter(torch.zeros(2, 2))
        make_optimizer(self, [probe])
        if self.optimizer == NO_OPTIMIZER and self.lr_schedule is not None:
            raise UsageError("an lr_schedule needs an optimizer; set optimizer (or no lr_schedule)")

    def _check_model_params(self) -> None:
        """Model parameters are a table the model's factory accepts (built once on the CPU to find out)."""
        if not isinstance(self.model_params, dict):
            raise UsageError(f"model_params must be a table of the model's factory arguments, e.g. {{mem = 16}}; "
                             f"got {self.model_params!r}")
        if self.model_params:
            make_model(self.model, make_task(self.task, **self.task_params), self.hidden_size, self.num_layers,
                       seed=0, path=self.path, model_params=self.model_params)

    def resolved_threads(self) -> int:
        """``threads``, or every CPU available to this process."""
        if self.threads is not None:
            return int(self.threads)
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer | None, Any]:
    """The optimiser and learning-rate scheduler of ``cfg`` over ``params`` (None, None for ``none``)."""
    if cfg.optimizer == NO_OPTIMIZER:
        return None, None
    cls = optimizer_class(cfg.optimizer)
    args = dict(cfg.optimizer_args or {})
    try:
        optimizer = cls(params, lr=cfg.lr, **args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"optimizer {cls.__name__} does not accept {args}: {exc}") from None
    if cfg.lr_schedule is None:
        return optimizer, None
    sched_cls = scheduler_class(cfg.lr_schedule)
    sched_args = dict(cfg.lr_schedule_args or {})
    try:
        scheduler = sched_cls(optimizer, **sched_args)
    except (TypeError, ValueError, KeyError) as exc:
        raise UsageError(f"lr_schedule {sched_cls.__name__} does not accept {sched_args}: {exc}") from None
    return optimizer, scheduler


@dataclass
class Run:
    """The objects of one run, built by :func:`build_run` (the one place that builds them)."""

    config: RunConfig
    task: Task
    method: Method
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    engine: Engine | OnlineEngine
    device: torch.device
    dtype: torch.dtype

    def step(self) -> None:
        """After an update's backward pass: clip, optimiser step, clear gradients, schedule step."""
        if self.optimizer is None:
            return
        if self.config.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def lr(self) -> float | None:
        """The learning rate the next update will use (the first parameter group's), or None."""
        return None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])


def build_run(cfg: RunConfig, method: Method | None = None) -> Run:
    """Task, method, model (θ from ``cfg.seed``), optimiser, scheduler and engine of a configuration.

    A mask method runs on the :class:`~tbptt_bench.core.engine.Engine`; an online (forward-mode) method
    on an :class:`~tbptt_bench.core.forward_mode.OnlineEngine` with the same contract (docs/online.md),
    whose randomised estimators draw from a generator seeded with
    ``derive_seed("online-signs", cfg.seed, spec)``.
    """
    cfg.validate()
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    method = method or parse_method(cfg.method)
    task = make_task(cfg.task, **cfg.task_params)
    model = make_model(cfg.model, task, cfg.hidden_size, cfg.num_layers, seed=cfg.seed, dtype=dtype,
                       device=device, path=cfg.path, model_params=cfg.model_params)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params)
    engine: Engine | OnlineEngine
    if method.forward_mode:
        signs = torch.Generator().manual_seed(derive_seed("online-signs", cfg.seed, method.spec))
        engine = OnlineEngine(model, task.loss_kind, functools.partial(method.estimator, generator=signs),
                              device=device, dtype=dtype)
    else:
        engine = Engine(model, task.loss_kind, device=device, dtype=dtype, checkpoint=method.checkpoint,
                        non_blocking=device.type == "cuda")
    return Run(cfg, task, method, model, params, optimizer, scheduler, engine, device, dtype)


# --------------------------------------------------------------------------- composed configurations

RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


class ComposedConfig:
    """A configuration that holds a :class:`RunConfig` (``run``) and adds its own fields.

    Subclasses are dataclasses declared with ``init=False`` whose first field is ``run``. They can be
    built from flat values (``TrainConfig(method="full", steps=10)``: run fields go to ``run``, on top
    of the subclass's :attr:`RUN_DEFAULTS`), and read run fields directly (``cfg.method``).
    """

    #: Run fields whose default differs for this kind of configuration.
    RUN_DEFAULTS: ClassVar[dict[str, Any]] = {}
    run: RunConfig

    def __init__(self, run: RunConfig | dict[str, Any] | None = None, **values: Any) -> None:
        own = {f.name for f in dataclasses.fields(self)} - {"run"}  # type: ignore[arg-type]
        unknown = sorted(set(values) - own - set(RUN_FIELDS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got an unknown field {unknown[0]!r}")
        if isinstance(run, dict):
            run = RunConfig(**run)
        run_values = {k: v for k, v in values.items() if k in RUN_FIELDS}
        self.run = dataclasses.replace(run, **run_values) if run is not None else RunConfig(
            **{**self.RUN_DEFAULTS, **run_values})
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "run":
                continue
            if f.name in values:
                setattr(self, f.name, values[f.name])
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
            else:
                setattr(self, f.name, f.default)

    def __getattr__(self, name: str) -> Any:
        run = self.__dict__.get("run")
        if run is not None and name in RUN_FIELDS:
            return getattr(run, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def flat(self) -> dict[str, Any]:
        """Run fields and own fields in one mapping (what suites, stores and JSON files hold)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run"}  # type: ignore[arg-type]
        return {**dataclasses.asdict(self.run), **own}

    @classmethod
    def options(cls) -> dict[str, Option]:
        """Every flat field's declaration (run fields first, with this kind's :attr:`RUN_DEFAULTS`): what its
        command's flags and its suite keys derive from."""
        return {**declared(RunConfig, defaults=cls.RUN_DEFAULTS), **declared(cls, skip={"run"})}

    @classmethod
    def schema(cls) -> dict[str, tuple[Any, Any]]:
        """Field name → (type hint, default) over the flat fields, ``seed`` excluded (suites set it)."""
        return schema(cls.options(), skip={"seed"})


def parse_kwargs(text: str, what: str) -> dict[str, Any]:
    """Keyword arguments from JSON (``{"momentum": 0.9}``) or ``k=v,k=v`` (values read as JSON, else text)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{what}: {text!r} is not valid JSON ({exc.msg}); write {{\"key\": value}} "
                             "or key=value,key=value") from None
        if not isinstance(value, dict):
            raise UsageError(f"{what}: expected a JSON object, got {text!r}")
        return value
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what}: malformed item {item!r}; write key=value,key=value or a JSON object")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
