"""lightning_merge: merge fine-tuned models and LoRA adapters inside PyTorch Lightning runs."""

import importlib

from .api import merge_models
from .errors import ConfigError, IncompatibleTensorError, MergeError, SourceError
from .methods import METHOD_CLASSES, MergeMethod, get_method, method_names

globals().update(METHOD_CLASSES)  # every built-in method class: Ties, DareTies, NuSlerp, ...

__version__ = "0.1.0"

#: names imported on first use, by the submodule that has them: the Lightning layer, the learned
#: merges (AdaMerging, DAM, Sens-Merging, RegMean, Fisher), PLeaS and the MoE merges all import
#: lightning or scipy, which the core and the CLI do not pay for
_LAZY = {
    "lightning": ("DPPAAlphaSearch", "MergeCallback", "MergeSearch"),
    "learned": ("FisherMergeCallback", "LearnedMerge", "MergeStatistics", "PerTaskTokensDataModule",
                "RegMeanMergeCallback", "SensFactors", "SensMergeCallback", "SensScaled", "compute_sens_factors"),
    "pleas": ("PLeaSMergeCallback", "pleas_merge", "pleas_merge_result"),
    "moe": ("MoEMergeCallback", "RoutingStatistics", "drop_experts", "mcsmoe", "mcsmoe_compress", "msmoe_merge"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'lightning_merge' has no attribute {name!r}")


__all__ = sorted(METHOD_CLASSES) + [
    "ConfigError", "IncompatibleTensorError", "MergeError", "MergeMethod", "SourceError", "get_method",
    "merge_models", "method_names",
] + sorted(_LAZY_NAMES)
