"""Truncated BPTT in Lightning 2: TBPTT(k1, k2) through ``self.manual_backward``, state carried across batches.

Lightning 2 dropped ``truncated_bptt_steps``; this mixin brings any method of the project back in
manual optimisation (docs/design.md §7.4). Each update's loss goes through ``self.manual_backward``,
so precision plugins (``bf16-mixed``, ``16-mixed`` with its scaler) and strategies apply; the
forward passes run inside ``training_step``, under the precision plugin's autocast. The user keeps
the optimiser, scheduler and clipping::

    class Model(TBPTTMixin, lightning.LightningModule):
        tbptt_method = "tbptt:k1=16,k2=32"

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = wrap_rnn(nn.LSTM(32, 64, batch_first=True), nn.Linear(64, 100), nn.Embedding(100, 32))

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            for step in self.tbptt_updates(batch, self.net):
                self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad()

Import this module only when Lightning is installed (the ``lightning`` extra).
"""

from __future__ import annotations

import logging
from typing import Iterator

from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.loop import TBPTT, BatchLike, Step, as_batch

try:
    import lightning  # noqa: F401  (checked here so that the error says what to install)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("tbptt_bench.lightning needs Lightning 2: pip install 'tbptt-bench[lightning]'") from exc

log = logging.getLogger(__name__)


class TBPTTMixin:
    """Mixin for a ``LightningModule`` with ``automatic_optimization = False``.

    Class attributes: ``tbptt_method`` (a method spec), ``tbptt_loss`` (``"cross_entropy"`` or
    ``"mse"``), ``tbptt_seed`` (the method's own draws), ``tbptt_boundary`` (``"carry"``: the batches
    are consecutive pieces of one stream, gradient and updates run across them; ``"cut"``: each batch
    is a segment of its own; see :class:`~tbptt_bench.loop.TBPTT`), ``tbptt_log_name`` (the logged
    key). The stream ends at the start of every training epoch (its waiting losses are closed as one
    update, yielded first in the next batch); call :meth:`tbptt_reset` for other boundaries.
    """

    tbptt_method: str = "chunked:k=32"
    tbptt_loss: str = "cross_entropy"
    tbptt_seed: int = 0
    tbptt_boundary: str = "carry"
    tbptt_log_name: str = "tbptt_loss"

    def tbptt_updates(self, batch: BatchLike, model: nn.Module | None = None) -> Iterator[Step]:
        """Each update of the method over ``batch``, already backpropagated through ``manual_backward``.

        ``model`` (default: this module) follows the model protocol. Each update's loss per scored step
        is logged under ``tbptt_log_name`` (the step value and the epoch mean over updates).
        """
        if getattr(self, "automatic_optimization", True):
            raise UsageError("tbptt_updates needs manual optimisation: set self.automatic_optimization = False in __init__")
        data = as_batch(batch)
        runner = self._tbptt_runner(model if model is not None else self)  # type: ignore[arg-type]
        for step in runner.steps(data):
            self.manual_backward(step.loss)  # type: ignore[attr-defined]
            scored = step.weights.sum() / data.batch_size
            per_step = step.loss.detach() / scored.clamp_min(1e-12)
            self.log(self.tbptt_log_name, per_step, on_step=True, on_epoch=True,  # type: ignore[attr-defined]
                     prog_bar=True, batch_size=data.batch_size)
            yield step

    def tbptt_reset(self) -> None:
        """Start the next batch from the model's initial state."""
        runner = self.__dict__.get("_tbptt")
        if runner is not None:
            runner.reset()

    def on_train_epoch_start(self) -> None:
        """Reset the carried state: each epoch reads the stream from its start."""
        self.tbptt_reset()

    @property
    def tbptt(self) -> TBPTT | None:
        """The runner (method, carried state, update count), once the first batch has been seen."""
        return self.__dict__.get("_tbptt")

    def _tbptt_runner(self, model: nn.Module) -> TBPTT:
        """The runner for ``model``, made on first use (after Lightning has placed the module)."""
        runner: TBPTT | None = self.__dict__.get("_tbptt")
        first = next(model.parameters(), None)
        moved = runner is not None and first is not None and (
            runner.engine.device != first.device or runner.engine.dtype != first.dtype)
        if runner is None or runner.model is not model or moved:
            runner = TBPTT(model, self.tbptt_method, self.tbptt_loss, boundary=self.tbptt_boundary, seed=self.tbptt_seed)
            self.__dict__["_tbptt"] = runner
        return runner

