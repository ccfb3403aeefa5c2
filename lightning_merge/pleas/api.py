"""PLeaS from Python: :func:`pleas_merge` (the merged module) and :func:`pleas_merge_result` (with the
matching, the widths and the least-squares errors), and :func:`save_merged` (an HF folder or a
safetensors file, written atomically).

PLeaS (Nasery, Hayase, Koh, Oh, "PLeaS: Merging Models with Permutations and Least Squares",
CVPR 2025, arXiv 2407.02447; code github.com/SewoongLab/PLeaS-Merging) merges two models of one
architecture, possibly trained from different initialisations or bases, into one model whose
width lies between one model's (n) and both together (2n):

1. features of both models on the same calibration inputs (:mod:`.collect`);
2. a permutation per group of units and the choice of the pairs to merge (:mod:`.match`);
3. each layer's weights by least squares against the permuted, combined features (:mod:`.solve`).

``method="permute"`` stops after step 2 with the permute-and-average weights at the same width
(permutation alignment alone: ZipIt!/Git Re-Basin style); ``method="average"`` is plain weight
averaging (no permutation, width 1.0). ``data_free=True`` is PLeaS-free: the features come from
data that are not the fine-tuning domains' (the given loader of other data, or generic random
inputs, :func:`~.collect.generic_batches`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .collect import FeatureStats, collect_features, generic_batches
from .match import Budget, Metric, axis_plans, match_groups, plan_units, width_ratio
from .solve import merge_weights
from .spec import Head, PLeaSSpec, build_spec, check_same_architecture

log = logging.getLogger(__name__)

Method = Literal["pleas", "permute", "average"]

__all__ = ["PLeaSResult", "pleas_merge", "pleas_merge_result", "save_merged"]


@dataclass
class PLeaSResult:
    """The merged model and how it was made.

    Attributes:
        model: the merged module (a new module; the inputs are not changed).
        widths: the merged width of every feature axis (e.g. ``inter0``: the first MLP's units).
        permutations: per group, the unit of B matched to each unit of A.
        separate: per group, how many matched pairs were kept separate (both units kept).
        errors: per linear layer, the relative least-squares residual on the calibration data.
        statistics: the feature moments (None for ``method="average"``).
    """

    model: nn.Module
    widths: dict[str, int]
    permutations: dict[str, Tensor]
    separate: dict[str, int]
    errors: dict[str, float]
    statistics: FeatureStats | None
    spec: PLeaSSpec

    @property
    def error(self) -> float:
        """The mean relative least-squares error over the layers (0 for the baselines)."""
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0


def _check_options(method: str, ridge: float, calibration_batches: int) -> None:
    if method not in ("pleas", "permute", "average"):
        raise ConfigError(f"pleas: method {method!r} is not 'pleas', 'permute' (alignment only) or 'average'")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or ridge == float("inf"):
        raise ConfigError(f"pleas: ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ConfigError(f"pleas: calibration_batches must be a positive integer, got {calibration_batches!r}")


def pleas_merge_result(model_a: nn.Module, model_b: nn.Module, dataloader: Iterable[Any] | None = None, *,
                       width: float | Mapping[str, float] = 1.5, method: Method = "pleas", head: Head = "shared",
                       budget: Budget = "uniform", metric: Metric = "distance", ridge: float = 1e-4,
                       calibration_batches: int = 32, data_free: bool = False, seed: int = 0,
                       statistics: FeatureStats | None = None, device: torch.device | None = None) -> PLeaSResult:
    """Merge ``model_a`` and ``model_b`` with PLeaS (module doc); returns a :class:`PLeaSResult`.

    Args:
        dataloader: calibration batches (tensors, ``(inputs, labels)`` or dicts of model inputs), run
            through both models; ``data_free=True`` marks them as data from other domains, and
            without a loader draws generic random inputs.
        width: merged width / one model's width, 1.0 (full merge) to 2.0 (no merging), for every
            partial group; or ``{group: width}`` (plain stacks: ``hidden<i>``).
        method: ``"pleas"``, ``"permute"`` (alignment + average, same width) or ``"average"``.
        head: ``"shared"`` (one label space: outputs averaged) or ``"separate"`` (per-task heads kept
            side by side: the merged output is [A's outputs, B's outputs]).
        budget: ``"uniform"`` or ``"matching"`` (separate units spent on the worst-matched pairs).
        metric: ``"distance"`` (squared feature distance) or ``"correlation"`` for the matching.
        ridge: λ relative to the mean diagonal of each layer's Gram matrix; pulls towards the
            permute-and-average weights.
        calibration_batches: batches used from the loader (or generic batches drawn).
        statistics: feature moments from an earlier pass (:attr:`PLeaSResult.statistics`) instead of
            running the models.
        device: where a DDP all-reduce of the statistics runs (None: CPU/gloo).
    """
    _check_options(method, ridge, calibration_batches)
    spec = build_spec(model_a, head)
    check_same_architecture(spec, model_a, model_b)
    if method == "average":
        for g, v in spec.groups.items():
            if v.partial and width_ratio(width, g) != 1.0:
                raise ConfigError(f"pleas: method='average' merges every unit (width 1.0), got width {width!r}")
    stats = statistics
    if stats is None and method != "average":
        batches: Iterable[Any] | None = dataloader
        if batches is None:
            if not data_free:
                raise ConfigError(f"pleas: method='{method}' needs calibration data: pass a dataloader (fine-tuning "
                                  "domains), or data_free=True for generic inputs (or a loader of other data)")
            batches = generic_batches(model_a, spec, calibration_batches, seed=seed)
        stats = collect_features(model_a, model_b, spec, batches, max_batches=calibration_batches, device=device,
                                 settings={"data_free": bool(data_free)})
    if stats is not None:
        missing = sorted(set(spec.sites) - set(stats.sums))
        if missing:
            raise ConfigError(f"pleas: the statistics have no features for sites {missing}; they belong to another "
                              "architecture")
    matches = match_groups(spec, stats, metric, identity=method == "average") if stats is not None else \
        _identity_matches(spec)
    units = plan_units(spec, matches, width, budget)
    plans = axis_plans(spec, units)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    merged, errors = merge_weights(spec, state_a, state_b, stats, plans, ridge=float(ridge),
                                   least_squares=method == "pleas")
    widths = {name: p.width for name, p in plans.items()}
    model = spec.build(merged, widths)
    model.train(model_a.training)
    sep = {g: len(u.sep_a) for g, u in units.items()}
    log.info("pleas (%s): widths %s, separate pairs %s, mean LS error %.4g", method,
             {g: widths.get(g) for g in spec.groups if g in widths}, sep,
             sum(errors.values()) / max(len(errors), 1))
    return PLeaSResult(model, widths, {g: m.perm for g, m in matches.items()}, sep, errors, stats, spec)


def _identity_matches(spec: PLeaSSpec) -> dict[str, Any]:
    from .match import GroupMatch

    return {g: GroupMatch(torch.arange(v.units), torch.zeros(v.units, dtype=torch.float64))
            for g, v in spec.groups.items()}


def pleas_merge(model_a: nn.Module, model_b: nn.Module, dataloader: Iterable[Any] | None = None,
                **kwargs: Any) -> nn.Module:
    """The merged module of :func:`pleas_merge_result` (same arguments)."""
    return pleas_merge_result(model_a, model_b, dataloader, **kwargs).model


def save_merged(model: nn.Module, out: str | Path, *, overwrite: bool = False, source_dir: str | Path | None = None,
                inputs: Iterable[str | Path] = ()) -> Path:
    """Write a merged model atomically: a Hugging Face model as a folder (``save_pretrained``: its config
    carries the new ``intermediate_size``; tokenizer files copied from ``source_dir``), any other module
    as one safetensors file of its state dict. Nothing is written if a check fails."""
    from ..targets.atomic import atomic_output_dir, atomic_output_file
    from ..targets.hf import COPIED_FILES

    out = Path(out)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        with atomic_output_dir(out, overwrite=overwrite, inputs=list(inputs)) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if source_dir is not None:
                for name in COPIED_FILES:
                    src = Path(source_dir) / name
                    if src.is_file() and not (tmp / name).exists():
                        shutil.copy2(src, tmp / name)
        log.info("pleas: merged model written to '%s'", out)
        return out
    from safetensors.torch import save_file

    with atomic_output_file(out, overwrite=overwrite, inputs=list(inputs)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    log.info("pleas: merged state dict written to '%s'", out)
    return out
