"""MoEMergeCallback: M-SMoE / MC-SMoE inside a Lightning fit, validate or test."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from ..errors import ConfigError
from ..lightning.ranks import Comm
from .compress import _check as _check_compression
from .compress import mcsmoe_compress
from .merge import MoEMerge, drop_experts, msmoe_merge, save_moe
from .stats import RoutingStatistics, collect_routing

log = logging.getLogger(__name__)

__all__ = ["MoEMergeCallback"]

Method = Literal["msmoe", "average", "drop"]
Split = Literal["train", "val", "test"]
_STAGE_SPLIT = {"fit": "train", "validate": "val", "test": "test"}


def _loaders(trainer: pl.Trainer, split: str) -> Any:
    """The run's own dataloaders of ``split`` (the data module's or the module's hooks, or those passed
    to the Trainer call)."""
    loop = {"train": trainer.fit_loop, "val": trainer.fit_loop.epoch_loop.val_loop,
            "test": trainer.test_loop}[split]
    if split == "val" and trainer.state.fn == "validate":
        loop = trainer.validate_loop
    source = getattr(loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    dm = getattr(trainer, "datamodule", None)
    hook = getattr(dm, f"{split}_dataloader", None) if dm is not None else None
    if callable(hook):
        return hook()
    raise ConfigError(f"MoEMergeCallback: no calibration data: the run has no {split} dataloader (calibration="
                      f"'{split}'); give the Trainer call a data module or dataloaders, or pass statistics=<file>")


class MoEMergeCallback(pl.Callback):
    """Merge a mixture-of-experts model's experts by routing statistics in the run's ``setup``.

    Args:
        num_experts: experts per block after the merge.
        method: ``"msmoe"`` (frequency-weighted merge of aligned groups, :func:`~lightning_merge.moe.msmoe_merge`),
            ``"average"`` (the same groups, plain mean, no alignment unless ``align`` says so) or
            ``"drop"`` (keep the most used experts, :func:`~lightning_merge.moe.drop_experts`).
        top_k, similarity, layout: as :func:`~lightning_merge.moe.msmoe_merge`.
        align: neuron alignment (default ``"weight"`` for msmoe, ``"none"`` for average).
        rank, sparsity: set both for MC-SMoE: then every merged expert is compressed into low rank plus
            structured sparse (:func:`~lightning_merge.moe.mcsmoe_compress`).
        calibration: the split whose dataloaders give the routing statistics (default: the stage's own:
            train for fit, val for validate, test for test).
        calibration_batches: batches of it (None: all).
        ignore_padding: leave out tokens whose ``attention_mask`` is 0.
        target: the attribute path of the Hugging Face model in the LightningModule (default ``model``
            when present, else the module itself).
        stages: the Trainer stages that merge (once per callback).
        statistics: a saved :class:`~lightning_merge.moe.RoutingStatistics` file instead of calibrating.
        statistics_out: where global rank 0 writes the collected statistics.
        out_dir: where global rank 0 writes the merged (compressed) model as a Hugging Face folder.
        overwrite: replace an existing ``out_dir``.

    The merge runs in ``setup``, before the strategy wraps the module and the optimizers are made, so
    a ``fit`` trains the smaller model. The calibration pass calls the target on each batch without
    ``labels`` in eval mode; under DDP each rank takes every world-size-th batch and the statistics
    are all-reduced, so every rank merges identically. After the merge :attr:`result` (and
    :attr:`compression`) hold what was done. Resuming a fit from a checkpoint of the merged model is
    not supported (the module is rebuilt with the original expert count): load the written
    ``out_dir`` instead.
    """

    def __init__(self, num_experts: int, *, method: Method = "msmoe", top_k: int | None = None,
                 align: str | None = None, similarity: str = "router-logits", layout: str = "compact",
                 rank: int | None = None, sparsity: float | None = None, calibration: Split | None = None,
                 calibration_batches: int | None = 8, ignore_padding: bool = True, target: str | None = None,
                 stages: Sequence[str] = ("fit", "validate", "test"), statistics: str | None = None,
                 statistics_out: str | None = None, out_dir: str | None = None, overwrite: bool = False) -> None:
        super().__init__()
        if method not in ("msmoe", "average", "drop"):
            raise ConfigError(f"MoEMergeCallback: method={method!r} is not one of ['msmoe', 'average', 'drop']")
        if (rank is None) != (sparsity is None):
            raise ConfigError("MoEMergeCallback: MC-SMoE needs both rank and sparsity (or neither, for M-SMoE alone); "
                              f"got rank={rank!r}, sparsity={sparsity!r}")
        if rank is not None:
            _check_compression(rank, sparsity, 1 << 30)
        bad = [s for s in stages if s not in _STAGE_SPLIT]
        if bad or not stages:
            raise ConfigError(f"MoEMergeCallback: stages {list(stages)} must be among {list(_STAGE_SPLIT)}")
        if calibration is not None and calibration not in ("train", "val", "test"):
            raise ConfigError(f"MoEMergeCallback: calibration={calibration!r} is not one of ['train', 'val', 'test']")
        if calibration_batches is not None and calibration_batches < 1:
            raise ConfigError(f"MoEMergeCallback: calibration_batches must be >= 1 or null, got {calibration_batches}")
        self.num_experts, self.method, self.top_k = num_experts, method, top_k
        self.align = align if align is not None else ("none" if method == "average" else "weight")
        self.similarity, self.layout, self.rank, self.sparsity = similarity, layout, rank, sparsity
        self.calibration, self.calibration_batches = calibration, calibration_batches
        self.ignore_padding = ignore_padding
        self.target, self.stages = target, tuple(stages)
        self.statistics_path, self.statistics_out = statistics, statistics_out
        self.out_dir, self.overwrite = out_dir, overwrite
        self.result: MoEMerge | None = None
        self.compression: Any = None
        self.time_s: float | None = None

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.target is None:
            found = getattr(pl_module, "model", None)
            return found if isinstance(found, nn.Module) else pl_module
        mod: Any = pl_module
        for part in self.target.split("."):
            mod = getattr(mod, part, None)
            if not isinstance(mod, nn.Module):
                raise ConfigError(f"MoEMergeCallback: target '{self.target}' is not a submodule of "
                                  f"{type(pl_module).__name__}")
        return mod

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages or self.result is not None:
            return
        start = time.perf_counter()
        model = self._target(pl_module)
        if self.out_dir is not None:  # every rank checks (reads only), so none waits for a failed one
            from ..targets.atomic import check_output_dir

            check_output_dir(Path(self.out_dir), self.overwrite)
        comm = Comm(trainer)
        if self.statistics_path is not None:
            stats = RoutingStatistics.load(self.statistics_path)
        else:
            split = self.calibration or _STAGE_SPLIT[stage]
            stats = collect_routing(model, _loaders(trainer, split), max_batches=self.calibration_batches,
                                    ignore_padding=self.ignore_padding,
                                    keep_tokens=2048 if self.align == "activation" else 0,
                                    device=comm.device if comm.on else None)
            if self.statistics_out and trainer.is_global_zero:
                stats.save(self.statistics_out)
        common = {"num_experts": self.num_experts, "statistics": stats, "top_k": self.top_k}
        if self.method == "drop":
            self.result = drop_experts(model, **common)
        else:
            self.result = msmoe_merge(model, **common, align=self.align,  # type: ignore[arg-type]
                                      weighting="frequency" if self.method == "msmoe" else "uniform",
                                      similarity=self.similarity, layout=self.layout)  # type: ignore[arg-type]
        if self.rank is not None:
            self.compression = mcsmoe_compress(model, rank=self.rank, sparsity=float(self.sparsity or 0.0))
        self.time_s = time.perf_counter() - start
        if self.out_dir is not None:
            if trainer.is_global_zero:
                self._write(model)
            trainer.strategy.barrier("moe_merge_written")
        for logger in trainer.loggers if trainer.is_global_zero else []:
            logger.log_metrics({"merge/time_s": self.time_s, "merge/num_experts": float(self.num_experts)}, step=0)
        log.info("MoEMergeCallback: %s to %d experts per block in %.2f s", self.method, self.num_experts, self.time_s)

    def _write(self, model: nn.Module) -> Path:
        assert self.result is not None
        report = self.result.report()
        if self.compression is None:
            return save_moe(model, self.out_dir, overwrite=self.overwrite, report=report)  # type: ignore[arg-type]
        from .compress import FACTORS

        rep = self.compression.report()
        report["compression"] = {k: v for k, v in rep.items() if k != "matrices"}
        return save_moe(model, self.out_dir, overwrite=self.overwrite, report=report,  # type: ignore[arg-type]
                        extra={FACTORS: self.compression.save_factors})

    def state_dict(self) -> dict[str, Any]:
        return {"merged": self.result is not None, "num_experts": self.num_experts, "method": self.method}
