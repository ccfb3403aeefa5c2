"""Merge methods: one family per module, registered by name (mergekit's snake_case names)."""

from .base import DeltaMethod, MergeMethod, TensorInputs, get_method, method_class, method_names, register
from .dare import DareLinear, DareTies
from .linear import Linear, TaskArithmetic
from .ties import Ties

__all__ = [
    "DareLinear",
    "DareTies",
    "DeltaMethod",
    "Linear",
    "MergeMethod",
    "TaskArithmetic",
    "TensorInputs",
    "Ties",
    "get_method",
    "method_class",
    "method_names",
    "register",
]
