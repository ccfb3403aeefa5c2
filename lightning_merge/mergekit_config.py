"""The former home of the mergekit YAML reader, kept so that existing imports work.

Everything lives in :mod:`lightning_merge.mergekit` now (``from lightning_merge.mergekit import
parse_config``).
"""

from __future__ import annotations

from .mergekit import (
    MERGEKIT_METHODS,
    TOP_LEVEL_KEYS,
    UNSUPPORTED_MERGEKIT,
    LayerIndex,
    MergekitTensorParams,
    MergeRecipe,
    evaluate_setting,
    load_yaml,
    parse_config,
)

__all__ = ["MERGEKIT_METHODS", "TOP_LEVEL_KEYS", "UNSUPPORTED_MERGEKIT", "LayerIndex", "MergeRecipe",
           "MergekitTensorParams", "evaluate_setting", "load_yaml", "parse_config"]
