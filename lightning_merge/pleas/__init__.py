"""PLeaS: merge two models of one architecture (possibly from different bases) by permutation
matching and layer-wise least squares, to a chosen width (:mod:`.api`; the math in ``docs/pleas.md``).

The Lightning callback (:class:`PLeaSMergeCallback`) is imported on first use, so the pure-torch
parts do not import Lightning."""

from __future__ import annotations

from typing import Any

from .api import PLeaSResult, pleas_merge, pleas_merge_result, save_merged
from .collect import FeatureStats, collect_features, generic_batches
from .spec import PLeaSSpec, build_spec

__all__ = ["FeatureStats", "PLeaSMergeCallback", "PLeaSResult", "PLeaSSpec", "build_spec", "collect_features",
           "generic_batches", "pleas_merge", "pleas_merge_result", "save_merged"]


def __getattr__(name: str) -> Any:
    if name == "PLeaSMergeCallback":
        from .callback import PLeaSMergeCallback

        return PLeaSMergeCallback
    raise AttributeError(f"module 'lightning_merge.pleas' has no attribute {name!r}")
