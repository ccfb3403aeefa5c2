"""PLeaS inside Lightning runs: :class:`PLeaSMergeCallback`."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ..errors import ConfigError
from .api import PLeaSResult, pleas_merge_result, save_merged
from .collect import generic_batches
from .spec import build_spec

log = logging.getLogger(__name__)

__all__ = ["PLeaSMergeCallback"]

SPLITS = ("train", "val", "test")


def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def run_loaders(trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, who: str) -> list[Any]:
    """The run's own dataloaders of ``split``: the data module's, else those given to the Trainer call,
    else the LightningModule's ``*_dataloader`` hooks."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    name = f"{split}_dataloader"
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and is_overridden(name, dm):
        return _as_list(getattr(dm, name)())
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    loop = {"train": trainer.fit_loop, "test": trainer.test_loop,
            "val": trainer.validate_loop if str(fn) in ("validate", "TrainerFn.VALIDATING") else
            trainer.fit_loop.epoch_loop.val_loop}[split]
    src = getattr(loop, "_data_source", None)
    if src is not None and src.instance is not None and src.is_defined():
        return _as_list(src.dataloader())
    if is_overridden(name, pl_module):
        return _as_list(getattr(pl_module, name)())
    raise ConfigError(f"{who}: calibration='{split}' but the run has no {split} dataloader; PLeaS needs calibration "
                      "data: give the Trainer call a datamodule or dataloaders, choose another calibration split, "
                      "or set data_free=true")


class PLeaSMergeCallback(pl.Callback):
    """Merge the module's model with another model by PLeaS when a Trainer call starts.

    In ``setup`` (before DDP wraps the module, before ``configure_model`` and the optimizers), the
    model at ``target`` (model A) and ``other`` (model B: an HF folder loaded with A's class, or a
    safetensors / torch state-dict file loaded into a copy of A) run on the run's own calibration
    batches (``calibration``: the ``train``, ``val`` or ``test`` dataloaders, the first
    ``calibration_batches`` of each); the merged model (:func:`~lightning_merge.pleas.pleas_merge_result`)
    replaces ``target`` on every rank, and global rank 0 writes it to ``output_dir`` (an HF folder
    with the updated config, or a safetensors file for plain modules) when given.

    Under DDP each rank takes batches r, r + w, ... and the statistics are all-reduced, so every rank
    merges with one process's statistics over the same batches and builds the same model.

    Args:
        other: model B (HF folder, or state-dict file for plain ``nn.Sequential`` targets).
        width: merged width / one model's width, 1.0 (full merge) to 2.0 (no merging).
        target: attribute path of model A in the LightningModule (``model``).
        method: ``pleas``, ``permute`` (alignment + average) or ``average``.
        head, budget, metric, ridge: as :func:`~lightning_merge.pleas.pleas_merge_result`.
        calibration: which of the run's dataloaders give the features.
        calibration_batches: batches per dataloader.
        data_free: PLeaS-free: generic random inputs shaped like the calibration batches (only their
            shapes are read) instead of the fine-tuning data.
        stages: the Trainer calls that merge (``fit``, ``validate``, ``test``, ``predict``).
        output_dir: where global rank 0 writes the merged model (nothing is written before the merge
            succeeded); ``overwrite`` replaces an existing output.
        statistics_out: where global rank 0 writes the feature statistics (safetensors).
    """

    def __init__(self, other: str, *, width: float = 1.5, target: str = "model", method: str = "pleas",
                 head: str = "shared", budget: str = "uniform", metric: str = "distance", ridge: float = 1e-4,
                 calibration: str = "train", calibration_batches: int = 8, data_free: bool = False, seed: int = 0,
                 stages: list[str] | None = None, output_dir: str | None = None, overwrite: bool = False,
                 statistics_out: str | None = None) -> None:
        who = type(self).__name__
        if not other or not Path(other).exists():
            raise ConfigError(f"{who}: other={other!r} does not exist; give model B's HF folder or state-dict file")
        if calibration not in SPLITS:
            raise ConfigError(f"{who}: calibration {calibration!r} is not one of {list(SPLITS)}")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ConfigError(f"{who}: calibration_batches must be a positive integer, got {calibration_batches!r}")
        stages = list(stages) if stages is not None else ["fit", "validate", "test", "predict"]
        bad = [s for s in stages if s not in ("fit", "validate", "test", "predict")]
        if bad:
            raise ConfigError(f"{who}: stages {bad} are not Trainer calls (fit, validate, test, predict)")
        from .match import width_ratio

        if not isinstance(width, Mapping):
            width_ratio(width, "every group")
        if not target:
            raise ConfigError(f"{who}: target must name the LightningModule attribute that holds model A "
                              "(e.g. 'model')")
        self.other, self.width, self.target, self.method = str(other), width, target, method
        self.head, self.budget, self.metric, self.ridge = head, budget, metric, ridge
        self.calibration, self.calibration_batches, self.data_free, self.seed = (calibration, calibration_batches,
                                                                                  bool(data_free), seed)
        self.stages, self.output_dir, self.overwrite = stages, output_dir, overwrite
        self.statistics_out = statistics_out
        self.result: PLeaSResult | None = None
        self._merged_module: int | None = None

    # ---- inputs
    def _model_a(self, pl_module: pl.LightningModule) -> nn.Module:
        try:
            model = pl_module.get_submodule(self.target)
        except AttributeError:
            raise ConfigError(f"{type(self).__name__}: the LightningModule has no submodule '{self.target}' "
                              "(target=...)") from None
        return model

    def _model_b(self, model_a: nn.Module) -> nn.Module:
        path = Path(self.other)
        dtype = next(model_a.parameters()).dtype
        if path.is_dir():
            if not hasattr(type(model_a), "from_pretrained"):
                raise ConfigError(f"{type(self).__name__}: other='{path}' is a folder but the target is a "
                                  f"{type(model_a).__name__}; give a state-dict file for plain modules")
            model_b = type(model_a).from_pretrained(str(path), dtype=dtype)
        else:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            model_b = copy.deepcopy(model_a)
            try:
                model_b.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ConfigError(f"{type(self).__name__}: the models' architectures do not match: '{path}' does not "
                                  f"load into {type(model_a).__name__}: {str(e).splitlines()[0]}") from None
        return model_b.to(next(model_a.parameters()).device)

    # ---- the merge
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages or self._merged_module == id(pl_module):
            return
        who = type(self).__name__
        t0 = time.perf_counter()
        model_a = self._model_a(pl_module)
        spec = build_spec(model_a, self.head)  # type: ignore[arg-type]
        model_b = self._model_b(model_a)
        loaders = run_loaders(trainer, pl_module, self.calibration, who)
        batches: list[Any] = []
        for loader in loaders:
            for k, batch in enumerate(loader):
                if k >= self.calibration_batches:
                    break
                batches.append(batch)
        if not batches:
            raise ConfigError(f"{who}: the {self.calibration} dataloaders yielded no batch; PLeaS needs "
                              "calibration data")
        if self.data_free:
            batches = generic_batches(model_a, spec, len(batches), seed=self.seed, template=batches[0])
        from ..lightning.ranks import Comm

        comm = Comm(trainer)
        result = pleas_merge_result(
            model_a, model_b, batches, width=self.width, method=self.method, head=self.head,  # type: ignore[arg-type]
            budget=self.budget, metric=self.metric, ridge=self.ridge,  # type: ignore[arg-type]
            calibration_batches=len(batches), data_free=self.data_free, device=comm.device if comm.on else None)
        merged = result.model.to(next(model_a.parameters()).device)
        parent_name, _, leaf = self.target.rpartition(".")
        parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
        setattr(parent, leaf, merged)
        self.result = result
        self._merged_module = id(pl_module)
        elapsed = time.perf_counter() - t0
        if trainer.is_global_zero:
            if self.statistics_out and result.statistics is not None:
                result.statistics.save(self.statistics_out)
            if self.output_dir:
                save_merged(merged, self.output_dir, overwrite=self.overwrite,
                            source_dir=self.other if Path(self.other).is_dir() else None, inputs=[self.other])
            if trainer.logger is not None:
                metrics = {"merge/time_s": elapsed, "merge/pleas_ls_error": result.error}
                metrics.update({f"merge/width/{g}": float(result.widths[g]) for g in result.spec.groups
                                if g in result.widths and result.spec.groups[g].partial})
                trainer.logger.log_metrics(metrics, step=0)
        if comm.on:
            trainer.strategy.barrier("pleas_merge")
        log.info("%s: merged '%s' with '%s' in %.2f s (LS error %.4g)", who, self.target, self.other, elapsed,
                 result.error)
