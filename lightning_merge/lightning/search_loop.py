"""Run a search's validation epochs on a private copy of the Trainer's evaluation loop (Lightning 2.6).

:class:`PrivateValidationLoop` is a context manager. While it is open:

* the Trainer's evaluation loop of the running call (``trainer.fit_loop.epoch_loop.val_loop`` in
  ``fit``, ``trainer.validate_loop`` in ``validate``) is replaced by a fresh ``_EvaluationLoop``
  of the same kind that shares only its dataloader *source*; the real loop, with its progress
  counters, dataloaders, data fetcher and logged results, is not touched, and is put back on exit;
* the trainer's loggers and callbacks are detached (ModelCheckpoint, EarlyStopping, progress bars
  and this very callback do not see the candidate epochs; the module's logged metrics do not reach
  the logger), the stage is ``VALIDATING`` and ``limit_val_batches`` may be overridden.

:meth:`PrivateValidationLoop.run` runs one full validation epoch exactly as Lightning runs it
(module hooks, ``validation_step``, ``self.log`` / torchmetrics reduction, also across ranks) and
returns ``trainer.callback_metrics``. On exit the loop is torn down (its dataloader iterators and
workers released), the metrics it left are cleared, and everything is restored.

``validate``: the search runs inside the real loop's ``on_validation_start`` hook, after that loop
created its data fetcher; :func:`rearm_evaluation_loop` then gives it a fresh fetcher (its
``reset``, as at the start of its run), so a dataloader object shared with the search (one passed
as ``dataloaders=``, or with persistent workers) starts the real epoch from its first batch.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from ..errors import MergeError

__all__ = ["PrivateValidationLoop", "rearm_evaluation_loop"]


def _owner(trainer: pl.Trainer) -> tuple[Any, str]:
    """(object, attribute) holding the evaluation loop of the running Trainer call."""
    if trainer.state.fn == TrainerFn.FITTING:
        return trainer.fit_loop.epoch_loop, "val_loop"
    if trainer.state.fn == TrainerFn.VALIDATING:
        return trainer, "validate_loop"
    raise MergeError(f"MergeSearch: cannot run a validation epoch during trainer.{trainer.state.fn}")


class PrivateValidationLoop:
    """Context manager: a private validation loop for the search (see the module docstring)."""

    def __init__(self, trainer: pl.Trainer, limit_val_batches: int | float | None = None) -> None:
        self.trainer = trainer
        self.limit_val_batches = limit_val_batches
        self._owner, self._attr = _owner(trainer)
        self.real: _EvaluationLoop = getattr(self._owner, self._attr)
        self.loop = _EvaluationLoop(trainer, trainer.state.fn, RunningStage.VALIDATING, verbose=False,
                                    inference_mode=self.real.inference_mode)
        self.loop._data_source = self.real._data_source

    def __enter__(self) -> PrivateValidationLoop:
        t = self.trainer
        self._saved = (t.state.stage, t.loggers, t.callbacks, t.limit_val_batches)
        setattr(self._owner, self._attr, self.loop)
        t.loggers = []
        t.callbacks = []
        if self.limit_val_batches is not None:
            t.limit_val_batches = self.limit_val_batches
        t.state.stage = RunningStage.VALIDATING
        return self

    def run(self) -> dict[str, Any]:
        """One validation epoch of the module as it is now; returns the callback metrics."""
        connector = self.trainer._logger_connector
        connector.reset_results()
        connector.reset_metrics()
        self.loop.run()
        return dict(self.trainer.callback_metrics)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        t = self.trainer
        try:
            self.loop.teardown()
        finally:
            setattr(self._owner, self._attr, self.real)
            t.state.stage, t.loggers, t.callbacks, t.limit_val_batches = self._saved
            t._logger_connector.reset_results()
            t._logger_connector.reset_metrics()


def rearm_evaluation_loop(loop: _EvaluationLoop) -> None:
    """Give an evaluation loop that has started its run (``on_run_start``) a fresh data fetcher."""
    if loop._data_fetcher is not None:
        loop._data_fetcher.teardown()
    loop.reset()
