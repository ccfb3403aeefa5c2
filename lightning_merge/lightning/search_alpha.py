"""``DPPAAlphaSearch``: DPPA's amplification-factor coordinate search (spec §7.4) as a merge search.

The reference (``python_contral.py``) runs coordinate ascent over (α_top, α_band) = (α_hi, α_lo):

    α = start (reference (1.8, 0.0)); best = −∞ (the reference's 0, for its positive objective); coord = α_top
    loop:
        J = score of the DPPA merge at α
        if J beats best:  best = J; coord += step
        else:
            if coord > 1: coord −= step                         (step back)
            if coord is α_top: coord = α_band; α_band = band_start (1) if α_band < step else α_band + step
            else: stop

:func:`alpha_coordinate_ascent` is that loop as a generator (it yields α, receives J), with one
addition: at most ``max_evals`` evaluations (the reference has no bound). Every evaluated α is a
candidate row of the search (``origin`` ``alpha_top`` / ``alpha_band``: the coordinate being
moved); the merge kept is the best row, which is where the reference's loop ends too except for
its quirks (its final α_band after a failed first band step at 1.0 stays 1.0; a coordinate at or
below 1 is not stepped back): the *visited* sequence follows the reference exactly.

J is the monitored metric (``mode`` max or min) or, with ``dense_scores={metric: score of the
unpruned fine-tuned model}``, the reference's objective ``geomean_relative``: the geometric mean
over those metrics of metric / dense score (for two tasks, sqrt((s1/s1_dense)·(s2/s2_dense))).

Only the amplification is recomputed per α: DP's statistics passes and its two magnitude-pruning
masks per (tensor, expert) do not depend on α, so they are computed by the first candidate and
reused (:class:`MaskCachedDPPA`); each further candidate costs one multiply-and-combine pass over
the cached deltas (the masks cost 2 bytes per prunable entry and expert, on the cache device). The
merge is identical to :class:`~lightning_merge.methods.dppa.DPPA` at the same α.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ..engine import MergePlan, build_plan, compute_statistics
from ..errors import ConfigError, MergeError
from ..methods.base import MergeMethod, TensorInputs
from ..methods.dppa import DPPA
from .search import BaseMergeSearch, CacheDevice, Proposal, build_candidate
from .search_cache import SearchInputs

__all__ = ["DPPAAlphaSearch", "MaskCachedDPPA", "alpha_coordinate_ascent", "geomean_relative"]

ALPHA_KEYS = ("alpha_top", "alpha_band")
#: decimals α values are rounded to after each step (1.8 + 0.1 is 1.9, not 1.9000000000000001)
ROUND = 10


def alpha_coordinate_ascent(
    start: tuple[float, float] = (1.8, 0.0),
    step: float = 0.1,
    band_start: float = 1.0,
    max_evals: int = 50,
    better: Any = None,
) -> Generator[tuple[float, float, str], float, None]:
    """The §7.4 search as a generator: yields ``(alpha_top, alpha_band, coordinate)``, receives J.

    ``better(a, b)`` says whether score ``a`` beats ``b`` (default: ``a > b``; NaN never does). The
    first score beats the initial ``best`` unless it is NaN.
    """
    beats = better or (lambda a, b: a > b)
    alpha = [float(start[0]), float(start[1])]
    coord = 0
    best: float | None = None
    for _ in range(max_evals):
        score = yield alpha[0], alpha[1], ALPHA_KEYS[coord]
        if not math.isnan(score) and (best is None or beats(score, best)):
            best = score
            alpha[coord] = round(alpha[coord] + step, ROUND)
            continue
        if alpha[coord] > 1:
            alpha[coord] = round(alpha[coord] - step, ROUND)
        if coord == 1:
            return
        coord = 1
        alpha[1] = band_start if alpha[1] < step else round(alpha[1] + step, ROUND)
    rank_zero_warn(f"DPPAAlphaSearch: stopped after max_evals={max_evals} evaluations, before the reference's "
                   "stopping rule; raise max_evals to search further")


def geomean_relative(metrics: Mapping[str, Any], dense_scores: Mapping[str, float]) -> float:
    """(Π_k metrics[k] / dense_scores[k]) ** (1/K): the DPPA reference's objective (0 if any is 0)."""
    ratios = []
    for k, d in dense_scores.items():
        if k not in metrics:
            raise MergeError(f"DPPAAlphaSearch: the validation loop did not log '{k}' (a dense_scores key; "
                             f"logged: {sorted(metrics)})")
        ratios.append(float(metrics[k]) / float(d))
    if any(math.isnan(r) for r in ratios):
        return math.nan
    if any(r <= 0 for r in ratios):
        return 0.0
    return math.exp(math.fsum(math.log(r) for r in ratios) / len(ratios))


@dataclass(frozen=True, kw_only=True)
class MaskCachedDPPA(DPPA):
    """:class:`DPPA` that keeps each (tensor, expert)'s two DP masks in ``masks_cache`` and reuses them.

    Only valid while the inputs do not change (the deltas cached by a search) and for one set of
    densities: :meth:`with_params` for other α values keeps sharing the same ``masks_cache`` dict. Not
    registered (``get_method("dppa")`` stays :class:`DPPA`).
    """

    masks_cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def with_params(self, **params: Any) -> MergeMethod:
        if {"density_top", "density_band", "density_adjust", "layer_outlier_multiple",
                "matrix_outlier_multiple", "dppa_compat"} & set(params):
            raise ConfigError("MaskCachedDPPA: only the amplification factors may change; build a new one")
        return dataclasses.replace(self, **params)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(DPPA)}}

    def masks(self, inputs: TensorInputs, i: int, d: Tensor) -> tuple[Tensor, Tensor]:
        """DPPA's masks, computed once per (tensor, expert) and reused for every α."""
        key = (inputs.name, inputs.experts[i])
        if key not in self.masks_cache:
            self.masks_cache[key] = super().masks(inputs, i, d)
        return self.masks_cache[key]


class DPPAAlphaSearch(BaseMergeSearch):
    """Search DPPA's amplification factors (α_top, α_band) by the reference's coordinate ascent.

    Args:
        experts: expert checkpoints / folders / adapters (read once; cached as deltas).
        dppa: DPPA's other hyperparameters (``density_top``, ``density_band``, ``combination``,
            ``lambda``, ...; the defaults are DPPA's); ``alpha_top`` / ``alpha_band`` come from
            ``start`` and the search.
        weights: per-expert weights of the combination (None: 1 each).
        start: the first (alpha_top, alpha_band) (reference (1.8, 0.0)).
        step: the coordinate step (reference 0.1).
        band_start: where alpha_band jumps to when the α_band phase starts below ``step``
            (reference 1).
        max_evals: the most candidates evaluated (a bound the reference does not have).
        dense_scores: ``{metric: score of the unpruned fine-tuned expert}``: rank by the reference's
            ``geomean_relative`` objective instead of ``monitor`` (``mode`` must then be ``max``).
        monitor, mode, seed, base, target, csv_path, limit_val_batches, cache_device: as in
            :class:`~lightning_merge.lightning.search.MergeSearch`.

    The CSV has one row per evaluated α (``origin`` = the coordinate moved), with the metrics of
    ``dense_scores`` and the score (``geomean_relative`` or the monitored metric).
    """

    def __init__(
        self,
        experts: list[str],
        dppa: dict[str, Any] | None = None,
        weights: list[float] | None = None,
        start: tuple[float, float] = (1.8, 0.0),
        step: float = 0.1,
        band_start: float = 1.0,
        max_evals: int = 50,
        dense_scores: dict[str, float] | None = None,
        monitor: str = "val/acc_mean",
        mode: Literal["max", "min"] = "max",
        seed: int = 0,
        base: str | None = None,
        target: str | None = None,
        csv_path: str | None = None,
        limit_val_batches: int | float | None = None,
        cache_device: CacheDevice = "cpu",
    ) -> None:
        super().__init__(experts, monitor=monitor, mode=mode, seed=seed, base=base, target=target,
                         csv_path=csv_path, limit_val_batches=limit_val_batches, cache_device=cache_device)
        params = dict(dppa or {})
        clash = [k for k in ALPHA_KEYS if k in params] + (["method"] if "method" in params else [])
        if clash:
            raise ConfigError(f"DPPAAlphaSearch: dppa has {clash}: the method is DPPA and its amplification "
                              "factors are searched (give the first ones as start=[alpha_top, alpha_band])")
        if (not isinstance(start, (list, tuple)) or len(start) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a >= 0
                           for a in start)):
            raise ConfigError(f"DPPAAlphaSearch: start must be two finite numbers >= 0 (alpha_top, alpha_band), "
                              f"got {start!r}")
        for name, value in (("step", step), ("band_start", band_start)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "step" and value == 0):
                raise ConfigError(f"DPPAAlphaSearch: {name} must be a finite number "
                                  f"{'> 0' if name == 'step' else '>= 0'}, got {value!r}")
        if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
            raise ConfigError(f"DPPAAlphaSearch: max_evals must be a positive int, got {max_evals!r}")
        if dense_scores is not None:
            if not isinstance(dense_scores, Mapping) or not dense_scores:
                raise ConfigError("DPPAAlphaSearch: dense_scores must be a non-empty {metric: score} dict")
            for k, v in dense_scores.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ConfigError(f"DPPAAlphaSearch: dense_scores['{k}'] must be a positive number, got {v!r}")
            if mode != "max":
                raise ConfigError("DPPAAlphaSearch: the geomean_relative objective (dense_scores) is maximized; "
                                  "use mode='max'")
        self.dppa_params = params
        self.weights = None if weights is None else [float(w) for w in weights]
        self.start = (float(start[0]), float(start[1]))
        self.step, self.band_start, self.max_evals = float(step), float(band_start), max_evals
        self.dense_scores = None if dense_scores is None else {k: float(v) for k, v in dense_scores.items()}
        first = self._candidate(*self.start)
        method, _ = build_candidate(first, len(self.experts), "dppa at the start α", "DPPAAlphaSearch")
        self._template = MaskCachedDPPA(**{f.name: getattr(method, f.name) for f in dataclasses.fields(DPPA)})
        self._stats: Any = None

    def _candidate(self, alpha_top: float, alpha_band: float) -> dict[str, Any]:
        cand = {"method": "dppa", **self.dppa_params, "alpha_top": alpha_top, "alpha_band": alpha_band}
        if self.weights is not None:
            cand["weights"] = list(self.weights)
        return cand

    @property
    def score_name(self) -> str:
        return "geomean_relative" if self.dense_scores else self.monitor

    def _score(self, metrics: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        if not self.dense_scores:
            return super()._score(metrics)
        extra = {k: float(metrics[k]) for k in self.dense_scores if k in metrics}
        if self.monitor in metrics:
            extra[self.monitor] = float(metrics[self.monitor])
        return geomean_relative(metrics, self.dense_scores), extra

    def _config(self) -> dict[str, Any]:
        return {"experts": self.experts, "dppa": self.dppa_params, "weights": self.weights, "start": self.start,
                "step": self.step, "band_start": self.band_start, "max_evals": self.max_evals,
                "dense_scores": self.dense_scores, "monitor": self.monitor, "mode": self.mode, "seed": self.seed,
                "base": self.base, "target": self.target}

    def _proposals(self) -> Generator[Proposal, float, None]:
        self._template.masks_cache.clear()
        self._stats = None
        search = alpha_coordinate_ascent(self.start, self.step, self.band_start, self.max_evals, self.better)
        try:
            alpha_top, alpha_band, coord = next(search)
            while True:
                score = yield self._candidate(alpha_top, alpha_band), coord
                alpha_top, alpha_band, coord = search.send(score)
        except StopIteration:
            return

    def _method(self, candidate: dict[str, Any]) -> tuple[MergeMethod, list[float] | None]:
        method = self._template.with_params(alpha_top=candidate["alpha_top"], alpha_band=candidate["alpha_band"])
        return method, self.weights

    def _plan(self, method: MergeMethod, weights: list[float] | None, inputs: SearchInputs) -> MergePlan:
        plan = build_plan(inputs.base, inputs.experts, method, weights=weights, seed=self.seed, device=inputs.device)
        if self._stats is None:  # sharded: each rank observes its share, the statistics are combined
            comm = inputs.comm
            self._stats = compute_statistics(plan, gather=comm.gather if comm is not None and comm.on else None)
        plan.stats = self._stats
        return plan

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            super()._search(trainer, pl_module)
        finally:
            self._template.masks_cache.clear()  # the cached deltas are gone after the search: so are the masks
            self._stats = None
