"""Sens-Merging inside Lightning runs and as a merge method.

* :class:`SensMergeCallback`: a :class:`~lightning_merge.MergeCallback` that first runs the
  Sens-Merging calibration pass (:mod:`~lightning_merge.learned.sens`) on the run's own data, then
  merges with any method of the task-arithmetic family (task arithmetic, TIES, DARE, DELLA, ...)
  using w_i · σ_i^l as expert i's weight for every tensor of layer l. Everything else (DDP shares,
  resume without merging twice, diagnostics, ``restore()``) is the MergeCallback's.
* :class:`SensScaled` (registered as ``"sens_scaled"``): wraps a method with a saved factors file,
  so precomputed factors work wherever a method is accepted (``merge_models``, ``MergeCallback``).

Design: the factors are computed once, by the pure function
:func:`~lightning_merge.learned.sens.compute_sens_factors`, and enter the existing methods only
as per-tensor expert weights (the engine's ``tensor_params``): no method is re-implemented.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from ..engine import MergePlan, TensorTask
from ..errors import ConfigError
from ..lightning.callback import MergeCallback
from ..methods.base import MergeMethod, TensorInputs
from ..methods.registry import get_method
from ..sources.base import Source
from ..targets.module import is_sharded
from .bank import ExpertBank
from .sens import CombineMode, GroupBy, SensFactors, SensitivityWeight, compute_sens_factors

log = logging.getLogger(__name__)

__all__ = ["SensMergeCallback", "SensScaled"]


@dataclass(frozen=True, kw_only=True)
class SensScaled(MergeMethod):
    """``method`` with expert i's weight for a tensor of layer l multiplied by σ_i^l from ``factors``.

    Attributes:
        factors: path of a factors JSON (:meth:`SensFactors.save`, ``SensMergeCallback(factors_out=)``).
        method: the wrapped method's registered name (``task_arithmetic``, ``ties``, ``dare_ties``, ...).
        method_params: its hyperparameters, e.g. ``{"density": 0.3, "lambda": 0.5}``.
    """

    name = "sens_scaled"
    factors: str = ""
    method: str = "task_arithmetic"
    method_params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.factors:
            raise ConfigError("sens_scaled: parameter 'factors' must be the path of a Sens-Merging factors JSON")
        if self.method.strip().lower() == self.name:
            raise ConfigError("sens_scaled: parameter 'method' cannot be sens_scaled itself")
        inner = get_method(self.method, **dict(self.method_params or {}))
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_factors", SensFactors.load(self.factors))

    # capabilities are the wrapped method's
    @property
    def space(self) -> str:  # type: ignore[override]
        return self._inner.space

    @property
    def requires_base(self) -> bool:  # type: ignore[override]
        return self._inner.requires_base

    @property
    def allow_negative_weights(self) -> bool:  # type: ignore[override]
        return self._inner.allow_negative_weights

    @property
    def statistics_passes(self) -> int:  # type: ignore[override]
        return self._inner.statistics_passes

    def check_experts(self, n_experts: int) -> None:
        self._inner.check_experts(n_experts)
        if len(self._factors.experts) != n_experts:
            raise ConfigError(f"sens_scaled: the factors in '{self.factors}' are for {len(self._factors.experts)} "
                              f"experts, the merge has {n_experts}; compute them for these experts")

    def _scaled(self, inputs: TensorInputs) -> TensorInputs:
        sigma = self._factors.weights(inputs.name)
        return dataclasses.replace(inputs, weights=[w * sigma[e] for w, e in zip(inputs.weights, inputs.experts)])

    def merge(self, inputs: TensorInputs) -> Tensor:
        return self._inner.merge(self._scaled(inputs))

    def init_statistics(self) -> Any:
        return self._inner.init_statistics()

    def observe(self, stats: Any, pass_index: int, inputs: TensorInputs) -> None:
        self._inner.observe(stats, pass_index, self._scaled(inputs))

    def finish_pass(self, stats: Any, pass_index: int) -> Any:
        return self._inner.finish_pass(stats, pass_index)

    def combine_statistics(self, parts: list[Any], pass_index: int) -> Any:
        return self._inner.combine_statistics(parts, pass_index)


def expert_task_loaders(trainer: pl.Trainer, n_experts: int, expert_tasks: list[str] | None,
                        who: str) -> tuple[dict[str, Any], list[str]]:
    """The run's per-task calibration loaders and each expert's task (``expert_tasks``, else the data
    module's first ``n_experts`` tasks, in order); the calibration passes of Sens-Merging, RegMean and
    Fisher merging all start here."""
    loaders = _calibration_loaders(getattr(trainer, "datamodule", None), who)
    tasks = expert_tasks or list(loaders)[:n_experts]
    if len(tasks) < n_experts:
        raise ConfigError(f"{who}: {n_experts} experts but the data module has only the tasks {list(loaders)}; "
                          "set expert_tasks")
    return loaders, tasks


def _calibration_loaders(dm: Any, who: str) -> dict[str, Any]:
    """Per-task calibration batches from the run's data module."""
    if dm is None:
        raise ConfigError(f"{who}: the Trainer has no data module; the calibration pass needs per-task data "
                          "(pass a datamodule, or precomputed factors=...)")
    loaders = dm.train_dataloader()
    if isinstance(loaders, Mapping):
        return dict(loaders)
    tasks = getattr(dm, "train_tasks", None) or getattr(dm, "task_names", None)
    if tasks and callable(getattr(dm, "dataset", None)):
        bs = getattr(dm, "batch_size", 16)
        return {t: DataLoader(dm.dataset("train", t), batch_size=bs, shuffle=False) for t in tasks}
    raise ConfigError(f"{who}: cannot find per-task calibration data: the data module's train_dataloader() must "
                      "return {task: DataLoader} (e.g. PerTaskTokensDataModule) or it must have dataset(split, "
                      "task) and task_names (SyntheticTokensDataModule); or pass precomputed factors=...")


class SensMergeCallback(MergeCallback):
    """Sens-Merging: calibrate on the run's data, then merge with per-layer expert weights.

    Args (besides :class:`~lightning_merge.MergeCallback`'s, with ``method`` any method that takes
    per-expert weights):
        calibration_batches: batches per task in the calibration pass.
        layer_temperature, cross_temperature, temperature: T_α, T_τ and T of
            :mod:`~lightning_merge.learned.sens`.
        combine: ``"softmax"`` (over the experts, per layer) or ``"product"``.
        sensitivity_weight: ``"full"`` (|θ_i ⊙ ∇L|) or ``"delta"`` (|δ_i ⊙ ∇L|).
        group_by: ``"layer"`` (blocks / modules) or ``"tensor"``.
        expert_tasks: the data task of each expert; default: the data module's tasks in order.
        factors: a saved factors JSON to use instead of calibrating.
        factors_out: where global rank 0 writes the computed factors (JSON).

    The calibration runs in ``setup`` on the device the target is on then (CPU under Lightning's
    usual order), on every rank over the same batches (no sampler yet), so every rank computes the
    same factors without communication. Its footprint is the experts' task vectors (float32) plus
    one expert copy and its gradient, released before the merge.
    """

    def __init__(self, experts: list[str], method: MergeMethod | str = "task_arithmetic", *,
                 calibration_batches: int = 8, layer_temperature: float = 1.0, cross_temperature: float = 1.0,
                 temperature: float = 1.0, combine: CombineMode = "softmax",
                 sensitivity_weight: SensitivityWeight = "full", group_by: GroupBy = "layer",
                 expert_tasks: list[str] | None = None, factors: str | None = None, factors_out: str | None = None,
                 **kwargs: Any) -> None:
        who = type(self).__name__
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ConfigError(f"{who}: calibration_batches must be a positive integer, got {calibration_batches!r}")
        for arg, v in (("layer_temperature", layer_temperature), ("cross_temperature", cross_temperature),
                       ("temperature", temperature)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                raise ConfigError(f"{who}: {arg} must be a positive finite number, got {v!r}")
        for arg, v, choices in (("combine", combine, ("softmax", "product")),
                                ("sensitivity_weight", sensitivity_weight, ("full", "delta")),
                                ("group_by", group_by, ("layer", "tensor"))):
            if v not in choices:
                raise ConfigError(f"{who}: {arg} = {v!r} is not one of {list(choices)}")
        if expert_tasks is not None and (isinstance(expert_tasks, str) or len(expert_tasks) != len(experts)):
            raise ConfigError(f"{who}: expert_tasks must name one data task per expert ({len(experts)}), "
                              f"got {expert_tasks!r}")
        self.sens = {"calibration_batches": calibration_batches, "layer_temperature": float(layer_temperature),
                     "cross_temperature": float(cross_temperature), "temperature": float(temperature),
                     "combine": combine, "sensitivity_weight": sensitivity_weight, "group_by": group_by,
                     "expert_tasks": list(expert_tasks) if expert_tasks is not None else None}
        self.factors_path, self.factors_out = factors, factors_out
        self.factors: SensFactors | None = SensFactors.load(factors) if factors is not None else None
        super().__init__(experts, method, **kwargs)
        if self.factors is not None and len(self.factors.experts) != len(self.experts):
            raise ConfigError(f"{who}: factors '{factors}' are for {len(self.factors.experts)} experts, not "
                              f"{len(self.experts)}")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sens": self.sens, "factors": self.factors_path}

    def _plan(self, trainer: pl.Trainer, target: nn.Module, experts: list[Source], sources: list[Source],
              sharded: bool = False) -> tuple[MergePlan, list[TensorTask], Any]:
        plan, tasks, gathered = super()._plan(trainer, target, experts, sources, sharded)
        if self.factors_path is None:
            self.factors = self._calibrate(trainer, target, plan)
            if self.factors_out and trainer.is_global_zero:
                self.factors.save(self.factors_out)
        assert self.factors is not None
        plan.tensor_params = self.factors.scaled(plan.weights)
        return plan, tasks, gathered

    def _calibrate(self, trainer: pl.Trainer, target: nn.Module, plan: MergePlan) -> SensFactors:
        who = type(self).__name__
        loaders, tasks = expert_task_loaders(trainer, len(plan.experts), self.sens["expert_tasks"], who)
        device = next(iter(target.parameters())).device
        bank = ExpertBank(target, plan, adopt=False).to(device)  # a sharded target: this rank's rows
        runner: Any
        if is_sharded(target):
            from .sharded import ShardedRunner

            runner = ShardedRunner(target, bank, device)
        else:
            def runner(params: dict[str, Tensor], inputs: Mapping[str, Any]) -> Any:
                moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
                return functional_call(target, params, args=(), kwargs=moved, tie_weights=True, strict=False)

        was_training = target.training
        target.eval()  # no dropout noise in the sensitivities
        try:
            factors = compute_sens_factors(
                bank, runner, loaders, tasks, max_batches=self.sens["calibration_batches"],
                sensitivity_weight=self.sens["sensitivity_weight"], group_by=self.sens["group_by"],
                layer_temperature=self.sens["layer_temperature"], cross_temperature=self.sens["cross_temperature"],
                temperature=self.sens["temperature"], combine=self.sens["combine"])
        finally:
            if hasattr(runner, "close"):
                runner.close()  # the sharded target gets θ₀ back before the merge reads it
            target.train(was_training)
            del bank
        return factors
