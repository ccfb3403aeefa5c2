"""lightning_merge: merge fine-tuned models and LoRA adapters inside PyTorch Lightning runs."""

from .api import merge_models
from .errors import ConfigError, IncompatibleTensorError, MergeError, SourceError
from .methods import METHOD_CLASSES, MergeMethod, get_method, method_names

globals().update(METHOD_CLASSES)  # every built-in method class: Ties, DareTies, NuSlerp, ...

__version__ = "0.1.0"


_LEARNED = ("FisherMergeCallback", "LearnedMerge", "MergeStatistics", "PerTaskTokensDataModule",
            "RegMeanMergeCallback", "SensFactors", "SensMergeCallback", "SensScaled", "compute_sens_factors")


def __getattr__(name: str):
    # the Lightning layer is imported on first use, so the core and the CLI do not pay for lightning
    if name in ("MergeCallback", "MergeSearch", "DPPAAlphaSearch"):
        from . import lightning

        return getattr(lightning, name)
    if name in _LEARNED:  # learned merges (AdaMerging, DAM, Sens-Merging, RegMean, Fisher) import lightning too
        from . import learned

        return getattr(learned, name)
    raise AttributeError(f"module 'lightning_merge' has no attribute {name!r}")


__all__ = sorted(METHOD_CLASSES) + [
    "ConfigError", "DPPAAlphaSearch", "FisherMergeCallback", "IncompatibleTensorError", "LearnedMerge",
    "MergeCallback", "MergeError", "MergeMethod", "MergeSearch", "MergeStatistics", "PerTaskTokensDataModule",
    "RegMeanMergeCallback", "SensFactors", "SensMergeCallback", "SensScaled",
    "SourceError", "compute_sens_factors", "get_method", "merge_models", "method_names",
]
