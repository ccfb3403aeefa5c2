"""lightning_merge: merge fine-tuned models and LoRA adapters inside PyTorch Lightning runs."""

from .errors import ConfigError, IncompatibleTensorError, MergeError, SourceError
from .methods import (
    DareLinear,
    DareTies,
    Linear,
    MergeMethod,
    TaskArithmetic,
    Ties,
    get_method,
    method_names,
)

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "DareLinear",
    "DareTies",
    "IncompatibleTensorError",
    "Linear",
    "MergeError",
    "MergeMethod",
    "SourceError",
    "TaskArithmetic",
    "Ties",
    "get_method",
    "method_names",
]
