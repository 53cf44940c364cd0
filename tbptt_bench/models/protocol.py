"""The model protocol every recurrent model follows, and the model registry.

A model is an ``nn.Module`` with

* ``initial_state(batch_size) -> State`` — a tensor or a tuple of tensors whose dimension 1 is the
  batch (``[layers, B, H]`` as in ``nn.LSTM``); and
* ``forward(inputs[B, L, ...], state) -> (outputs[B, L, ...], new_state)``.

Optionally it declares ``cross_cut_parts``: the indices of the state tuple's parts that a truncation
leaves differentiable (docs/design.md §7.1), e.g. stored past states an attention layer reads. Without
it a cut detaches the whole state.

Optionally it offers ``input_fold() -> InputFold | None``: an equivalent model whose recurrence reads
the raw inputs (its input encoder folded into the first layer's input weights) and the chain rule
that maps that model's parameter gradients back (docs/design.md §3.9). Analyses that run many backward
passes over one forward pass (whole K curves) use it; training never does.

Optionally it splits ``forward`` into ``core(inputs, state) -> (features, new_state)`` and
``readout(features) -> outputs``. Parameters used only in ``readout`` act outside the recurrence:
every method keeps their direct gradient term (docs/design.md §2). Without the split every parameter is
treated as part of the recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Union, runtime_checkable

import torch
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.registry import Registry

State = Union[torch.Tensor, tuple[torch.Tensor, ...]]
ExecutionPath = Literal["fused", "cell"]


@runtime_checkable
class RecurrentModel(Protocol):
    """The protocol every model follows (built-in or user-defined)."""

    def initial_state(self, batch_size: int) -> State: ...

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...


def check_protocol(model: object) -> None:
    """Raise UsageError if ``model`` does not follow the recurrent-model protocol."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name in ("initial_state", "forward"):
        if not callable(getattr(model, name, None)):
            raise UsageError(f"model {type(model).__name__} lacks {name}(); see the RecurrentModel protocol")


def check_state(state: object) -> None:
    """Raise UsageError unless ``state`` is a tensor or a tuple of tensors with a batch dimension 1."""
    parts = state if isinstance(state, tuple) else (state,)
    if not parts or not all(isinstance(p, torch.Tensor) and p.dim() >= 2 for p in parts):
        raise UsageError(
            "a model state must be a tensor or a tuple of tensors shaped [..., B, ...] with the batch in "
            f"dimension 1; got {type(state).__name__}"
        )


def has_readout(model: nn.Module) -> bool:
    """Whether the model splits its forward into ``core`` and ``readout``."""
    return callable(getattr(model, "core", None)) and callable(getattr(model, "readout", None))


def map_state(fn, state: State) -> State:  # type: ignore[no-untyped-def]
    """Apply ``fn`` to every tensor of a state."""
    if isinstance(state, tuple):
        return tuple(fn(s) for s in state)
    return fn(state)


def detach_state(state: State) -> State:
    """Every tensor of the state detached: the default cut (docs/design.md §2.4)."""
    return map_state(lambda s: s.detach(), state)


def cross_cut_parts(model: object) -> tuple[int, ...]:
    """The state parts ``model`` declares differentiable across a cut (docs/design.md §7.1); () by default."""
    declared = getattr(model, "cross_cut_parts", ())
    if not isinstance(declared, tuple) or not all(isinstance(i, int) and i >= 0 for i in declared):
        raise UsageError(
            f"model {type(model).__name__}: cross_cut_parts must be a tuple of state-part indices ≥ 0, got {declared!r}"
        )
    return declared


@dataclass(frozen=True)
class InputFold:
    """An equivalent model for analysis, and the map of its parameter gradients back (docs/design.md §3.9).

    ``model`` computes the same outputs and states as the original for the same inputs and states;
    its parameters are the original's except those the fold replaces. ``pullback`` turns a gradient
    ``{name: tensor}`` of ``model``'s trainable parameters into one of the original's (same names and
    order as its ``named_parameters``).
    """

    model: nn.Module
    pullback: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def input_fold(model: object) -> InputFold | None:
    """The model's declared input fold (docs/design.md §3.9), or None when it declares none."""
    fold = getattr(model, "input_fold", None)
    if not callable(fold):
        return None
    out = fold()
    if out is not None and not isinstance(out, InputFold):
        raise UsageError(f"model {type(model).__name__}: input_fold() must return an InputFold or None, got {out!r}")
    return out


def truncate_state(state: State, keep: tuple[int, ...]) -> State:
    """The state after a cut: every part detached except the parts indexed by ``keep`` (docs/design.md §7.1)."""
    if not keep:
        return detach_state(state)
    if not isinstance(state, tuple) or max(keep) >= len(state):
        n = len(state) if isinstance(state, tuple) else 1
        raise UsageError(f"cross_cut_parts {keep} name parts beyond the model's {n}-part state; index parts 0..{n - 1}")
    return tuple(s if i in keep else s.detach() for i, s in enumerate(state))



def parameter_group(name: str) -> str:
    """The parameter group of a built-in parameter name: input, recurrent, bias or readout.

    ``encoder.*`` and ``*weight_ih*`` are input weights; ``*weight_hh*`` recurrent; ``*bias*`` of the
    core and encoder are biases; ``readout.*`` the read-out. Unknown names of user models: ``other``.
    """
    if name.startswith("readout."):
        return "readout"
    if "bias" in name:
        return "bias"
    if "weight_hh" in name:
        return "recurrent"
    if name.startswith("encoder.") or "weight_ih" in name:
        return "input"
    return "other"


MODELS: Registry[Callable[..., Any]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a model factory ``f(task, hidden_size, num_layers) -> module``."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        MODELS.register(name, factory)
        return factory

    return wrap
