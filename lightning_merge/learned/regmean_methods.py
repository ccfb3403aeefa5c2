"""``regmean`` and ``fisher``: the registered merge methods that read saved statistics.

Both work on the experts' full weights (``space="weight"``, no base needed) and take the
statistics from a file written by :class:`~lightning_merge.learned.RegMeanMergeCallback` /
:class:`~lightning_merge.learned.FisherMergeCallback` (``statistics_out=``) or
:meth:`~lightning_merge.learned.MergeStatistics.save`, so a data-aware merge runs offline in
``merge_models``, ``MergeCallback`` or a YAML recipe. The callbacks hand the statistics they
collected to the same classes in memory (:meth:`RegMean.with_statistics`). The math is in
:mod:`lightning_merge.learned.regmean`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from ..errors import ConfigError
from ..methods.base import MergeMethod, TensorInputs, check_choice, check_range
from ..methods.yaml_spec import Contract
from .regmean import MergeStatistics, fisher_average, regmean_solve, weighted_average

log = logging.getLogger(__name__)

__all__ = ["Fisher", "RegMean"]


class _WithStatistics(MergeMethod):
    """Shared by :class:`RegMean` and :class:`Fisher`: a statistics file or in-memory statistics."""

    kind = ""

    def _load(self) -> None:
        path = self.statistics  # type: ignore[attr-defined]
        stats = MergeStatistics.load(path, kind=self.kind) if path else None  # type: ignore[arg-type]
        object.__setattr__(self, "_stats", stats)
        if stats is None:
            log.debug("%s: no statistics; every tensor is merged by the weighted average", self.name)

    @property
    def stats(self) -> MergeStatistics | None:
        return getattr(self, "_stats", None)

    def with_statistics(self, stats: MergeStatistics) -> Any:
        """A copy that uses ``stats`` (in memory) instead of a file."""
        if stats.kind != self.kind:
            raise ConfigError(f"{self.name}: got {stats.kind} statistics, needs {self.kind}")
        import dataclasses

        out = dataclasses.replace(self)
        object.__setattr__(out, "_stats", stats)
        return out

    def with_params(self, **params: Any) -> Any:
        out = super().with_params(**params)
        if "statistics" not in params and out.stats is None and self.stats is not None:
            object.__setattr__(out, "_stats", self.stats)
        return out

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        if self.stats is not None:
            where = self.statistics or "<in memory>"  # type: ignore[attr-defined]
            self.stats.check_experts(n_experts, self.name, where)


@dataclass(frozen=True, kw_only=True)
class RegMean(_WithStatistics):
    """RegMean / RegMean++ merge of linear layers from Gram statistics; the rest averaged.

    Attributes:
        statistics: path of a RegMean statistics file (None: every tensor is the weighted average).
        alpha: α, the scale of the Grams' off-diagonal entries (FusionBench's
            ``reduce_non_diagonal_ratio``; 1 = the exact closed form, 0 = diagonal Grams).
        gram: ``"mean"`` (X_iᵀX_i / n_i, FusionBench) or ``"sum"`` (X_iᵀX_i, the paper's least
            squares over the concatenated tasks).
    """

    name = "regmean"
    kind = "regmean"
    reference = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (arXiv:2212.09849)"
    contract = Contract(identity={}, typical={"alpha": 0.5})
    space = "weight"
    requires_base = False
    allow_negative_weights = False
    statistics: str | None = None
    alpha: float = 1.0
    gram: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        check_range(self.name, "alpha", self.alpha, 0.0, 1.0, hint="alpha scales the off-diagonal Gram entries")
        check_choice(self.name, "gram", self.gram, ("mean", "sum"))
        self._load()

    def merge(self, inputs: TensorInputs) -> Tensor:
        single = inputs.single_input(self.name)
        if single is not None:
            return single
        stats = self.stats
        if stats is not None and inputs.tensors[0].ndim == 2 and stats.has(inputs.name, inputs.experts):
            grams = [stats.gram(inputs.name, e, self.gram) for e in inputs.experts]
            return regmean_solve(inputs.tensors, grams, inputs.weights, alpha=self.alpha,
                                 transpose=stats.transpose.get(inputs.name, True), name=inputs.name)
        return weighted_average(inputs.tensors, inputs.weights)


@dataclass(frozen=True, kw_only=True)
class Fisher(_WithStatistics):
    """Fisher merging: the per-element Fisher-weighted average of the experts' weights.

    Attributes:
        statistics: path of a Fisher statistics file (None: every tensor is the weighted average).
        floor: ε added to every Fisher value (FusionBench's ``minimal_fisher_weight``).
        normalize: scale expert i by 1/‖F_i‖ (normalized over the experts), as FusionBench's
            ``normalize_fisher_weight`` (its default).
    """

    name = "fisher"
    kind = "fisher"
    reference = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)"
    contract = Contract(identity={}, typical={"floor": 1e-4, "normalize": False})
    space = "weight"
    requires_base = False
    allow_negative_weights = False
    statistics: str | None = None
    floor: float = 1e-6
    normalize: bool = True

    def __post_init__(self) -> None:
        check_range(self.name, "floor", self.floor, 0.0, float("inf"), lo_open=True, hi_open=True,
                    hint="floor keeps the denominator positive where every Fisher value is 0")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"{self.name}: parameter 'normalize' must be true or false, got {self.normalize!r}")
        self._load()

    def coefficients(self, inputs: TensorInputs) -> list[float]:
        """c_i of the module doc of :mod:`~lightning_merge.learned.regmean` for the present experts."""
        stats = self.stats
        if not self.normalize or stats is None:
            return list(inputs.weights)
        norms = getattr(self, "_norms", None)
        if norms is None:
            norms = stats.fisher_norms()
            object.__setattr__(self, "_norms", norms)
        inv = [1.0 / (n + self.floor) for n in norms]
        total = sum(inv)
        return [w * inv[e] / total for w, e in zip(inputs.weights, inputs.experts)]

    def merge(self, inputs: TensorInputs) -> Tensor:
        single = inputs.single_input(self.name)
        if single is not None:
            return single
        stats = self.stats
        if stats is not None and stats.has(inputs.name, inputs.experts):
            fishers = [stats.mean(inputs.name, e) for e in inputs.experts]
            return fisher_average(inputs.tensors, fishers, self.coefficients(inputs), floor=self.floor)
        return weighted_average(inputs.tensors, inputs.weights)
