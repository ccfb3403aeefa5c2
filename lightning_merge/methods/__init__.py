"""Merge methods: one family per module, registered by name (mergekit's snake_case names)."""

from .adaptive_rms import AdaptiveRMS
from .base import DeltaMethod, MergeMethod, TensorInputs
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .dare import DareLinear, DareTies
from .della import Della, DellaLinear
from .dppa import DPPA
from .linear import Linear, TaskArithmetic
from .model_stock import ModelStock
from .registry import get_method, method_class, method_names, register
from .slerp import Slerp
from .ties import Ties

__all__ = [
    "DPPA",
    "AdaptiveRMS",
    "Breadcrumbs",
    "BreadcrumbsTies",
    "DareLinear",
    "DareTies",
    "Della",
    "DellaLinear",
    "DeltaMethod",
    "Linear",
    "MergeMethod",
    "ModelStock",
    "Slerp",
    "TaskArithmetic",
    "TensorInputs",
    "Ties",
    "get_method",
    "method_class",
    "method_names",
    "register",
]
