"""RegMean, RegMean++ and Fisher merging inside Lightning runs.

:class:`RegMeanMergeCallback` and :class:`FisherMergeCallback` are
:class:`~lightning_merge.MergeCallback` subclasses that first collect the statistics of each
expert on its own task's data from the run's data module (:mod:`.regmean_collect`), then merge
with :class:`~lightning_merge.learned.RegMean` / :class:`~lightning_merge.learned.Fisher` given
those statistics. Everything else (DDP shares and broadcasts, resume without merging twice,
diagnostics, ``restore()``) is the MergeCallback's. ``statistics_out`` saves them
(:class:`~lightning_merge.learned.MergeStatistics`) for an offline merge (``method: regmean`` /
``fisher`` with ``statistics: <file>``); ``statistics`` reuses a saved file instead of collecting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.func import functional_call

from ..engine import MergePlan, TensorTask, build_plan
from ..errors import ConfigError
from ..lightning.callback import MergeCallback
from ..lightning.ranks import Comm
from ..sources.base import Source
from ..targets.module import is_sharded
from .bank import ExpertBank
from .regmean import MergeStatistics
from .regmean_collect import collect_fishers, collect_grams
from .regmean_methods import Fisher, RegMean
from .sens_callback import expert_task_loaders

log = logging.getLogger(__name__)

__all__ = ["FisherMergeCallback", "RegMeanMergeCallback"]


class _StatisticsMergeCallback(MergeCallback):
    """Shared by the RegMean and Fisher callbacks: collect (or load) statistics, then merge."""

    kind = ""

    def __init__(self, experts: list[str], merge_method: RegMean | Fisher, *, calibration_batches: int,
                 expert_tasks: list[str] | None, statistics: str | None, statistics_out: str | None,
                 collect: dict[str, Any], **kwargs: Any) -> None:
        who = type(self).__name__
        for bad in ("method", "method_params"):
            if bad in kwargs and kwargs[bad] is None:  # LightningCLI passes MergeCallback's defaults
                del kwargs[bad]
            if bad in kwargs:
                raise ConfigError(f"{who}: '{bad}' is fixed ({merge_method.name}); set its parameters as arguments "
                                  f"of {who} (e.g. {sorted(collect)})")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ConfigError(f"{who}: calibration_batches must be a positive integer, got {calibration_batches!r}")
        if expert_tasks is not None and (isinstance(expert_tasks, str) or len(expert_tasks) != len(experts)):
            raise ConfigError(f"{who}: expert_tasks must name one data task per expert ({len(experts)}), "
                              f"got {expert_tasks!r}")
        self.collect = {"calibration_batches": calibration_batches,
                        "expert_tasks": list(expert_tasks) if expert_tasks is not None else None, **collect}
        self.statistics_path, self.statistics_out = statistics, statistics_out
        self.statistics: MergeStatistics | None = None
        if statistics is not None:
            self.statistics = MergeStatistics.load(statistics, kind=merge_method.kind)  # type: ignore[arg-type]
            self.statistics.check_experts(len(experts), who, statistics)
        super().__init__(experts, merge_method, **kwargs)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "collect": self.collect, "statistics": self.statistics_path}

    def _plan(self, trainer: pl.Trainer, target: nn.Module, experts: list[Source], sources: list[Source],
              sharded: bool = False) -> tuple[MergePlan, list[TensorTask], Any]:
        plan, tasks, gathered = super()._plan(trainer, target, experts, sources, sharded)
        if self.statistics_path is None:
            if sharded or is_sharded(target):
                raise ConfigError(f"{type(self).__name__}: collecting statistics on a sharded module "
                                  "(ModelParallelStrategy / FSDP2) is not supported; collect them with DDP or one "
                                  "device (statistics_out=...), then pass statistics=<file>")
            self.statistics = self._collect(trainer, target, plan)
            if self.statistics_out and trainer.is_global_zero:
                self.statistics.save(self.statistics_out)
                log.info("%s: statistics written to %s", type(self).__name__, self.statistics_out)
        assert self.statistics is not None
        plan.method = plan.method.with_statistics(self.statistics)  # type: ignore[union-attr]
        return plan, tasks, gathered

    def _run(self, bank: ExpertBank, call: Any, loaders: Mapping[str, Any], tasks: list[str], plan: MergePlan,
             device: Any) -> MergeStatistics:
        raise NotImplementedError

    def _collect(self, trainer: pl.Trainer, target: nn.Module, plan: MergePlan) -> MergeStatistics:
        who = type(self).__name__
        loaders, tasks = expert_task_loaders(trainer, len(plan.experts), self.collect["expert_tasks"], who)
        device = next(iter(target.parameters())).device
        deltas = build_plan(plan.base, plan.experts, None, space="delta", vocab_policy=self.vocab_policy)
        bank = ExpertBank(target, deltas, adopt=False).to(device)

        def call(params: dict[str, Tensor], inputs: Mapping[str, Any]) -> Any:
            moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            return functional_call(target, params, args=(), kwargs=moved, tie_weights=True, strict=False)

        was_training = target.training
        target.eval()  # no dropout noise in the statistics
        try:
            comm = Comm(trainer)
            return self._run(bank, call, loaders, tasks, plan, comm.device if comm.on else None)
        finally:
            target.train(was_training)
            del bank


class RegMeanMergeCallback(_StatisticsMergeCallback):
    """RegMean (or RegMean++ with ``plus_plus=True``): Grams on the run's data, then the closed-form merge.

    Args (besides :class:`~lightning_merge.MergeCallback`'s; the method is ``regmean``):
        alpha: α, the scale of the Grams' off-diagonal entries (``reduce_non_diagonal_ratio``).
        gram: ``"mean"`` (X_iᵀX_i / n_i) or ``"sum"`` (X_iᵀX_i).
        plus_plus: RegMean++: the Grams of each block on the partly merged model, block by block.
        ignore_padding: leave out the input rows where ``attention_mask`` is 0.
        calibration_batches: batches per task.
        expert_tasks: the data task of each expert; default: the data module's tasks in order.
        statistics: a saved statistics file to use instead of collecting.
        statistics_out: where global rank 0 writes the collected statistics (safetensors).

    The collection runs in ``setup`` on the device the target is on then; under DDP each rank
    takes its share of the batches and the sums are all-reduced, so every rank merges with the
    statistics of one process over all the batches. Its footprint is the experts' task vectors
    plus one expert copy and the Grams (in² float64 per layer and expert). ``ModelParallelStrategy``
    is refused for the collection (a saved ``statistics`` file works there).
    """

    kind = "regmean"

    def __init__(self, experts: list[str], *, alpha: float = 1.0, gram: str = "mean", plus_plus: bool = False,
                 ignore_padding: bool = True, calibration_batches: int = 8, expert_tasks: list[str] | None = None,
                 statistics: str | None = None, statistics_out: str | None = None, **kwargs: Any) -> None:
        method = RegMean(statistics=statistics, alpha=alpha, gram=gram)  # type: ignore[arg-type]
        super().__init__(experts, method, calibration_batches=calibration_batches, expert_tasks=expert_tasks,
                         statistics=statistics, statistics_out=statistics_out,
                         collect={"plus_plus": bool(plus_plus), "ignore_padding": bool(ignore_padding)}, **kwargs)

    def _run(self, bank: ExpertBank, call: Any, loaders: Mapping[str, Any], tasks: list[str], plan: MergePlan,
             device: Any) -> MergeStatistics:
        m = self.method
        assert isinstance(m, RegMean)
        return collect_grams(bank, call, loaders, tasks, max_batches=self.collect["calibration_batches"],
                             ignore_padding=self.collect["ignore_padding"], plus_plus=self.collect["plus_plus"],
                             weights=plan.weights, alpha=m.alpha, gram=m.gram, device=device)


class FisherMergeCallback(_StatisticsMergeCallback):
    """Fisher merging: diagonal Fishers on the run's data, then the Fisher-weighted average.

    Args (besides :class:`~lightning_merge.MergeCallback`'s; the method is ``fisher``):
        estimator: ``"empirical"`` (squared gradient of the labelled loss per batch) or
            ``"expected"`` (FusionBench's: of Σ sqrt(p)·log p over the predictions, per example).
        floor: ε added to every Fisher value.
        normalize: scale each expert by 1/‖F_i‖ (FusionBench's ``normalize_fisher_weight``).
        calibration_batches, expert_tasks, statistics, statistics_out: as :class:`RegMeanMergeCallback`.

    One forward and backward pass of one expert copy per batch; DDP as :class:`RegMeanMergeCallback`.
    """

    kind = "fisher"

    def __init__(self, experts: list[str], *, estimator: str = "empirical", floor: float = 1e-6,
                 normalize: bool = True, calibration_batches: int = 8, expert_tasks: list[str] | None = None,
                 statistics: str | None = None, statistics_out: str | None = None, **kwargs: Any) -> None:
        if estimator not in ("empirical", "expected"):
            raise ConfigError(f"FisherMergeCallback: estimator {estimator!r} is not one of ['empirical', 'expected']")
        method = Fisher(statistics=statistics, floor=floor, normalize=normalize)
        super().__init__(experts, method, calibration_batches=calibration_batches, expert_tasks=expert_tasks,
                         statistics=statistics, statistics_out=statistics_out, collect={"estimator": estimator},
                         **kwargs)

    def _run(self, bank: ExpertBank, call: Any, loaders: Mapping[str, Any], tasks: list[str], plan: MergePlan,
             device: Any) -> MergeStatistics:
        return collect_fishers(bank, call, loaders, tasks, max_batches=self.collect["calibration_batches"],
                               estimator=self.collect["estimator"], device=device)
