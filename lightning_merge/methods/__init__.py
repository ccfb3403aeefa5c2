"""Merge methods: one family per module, registered by name (mergekit's snake_case names)."""

from . import registry  # noqa: E402,F401  (registers the built-in methods)
from .adaptive_rms import AdaptiveRMS
from .base import DeltaMethod, MergeMethod, TensorInputs, get_method, method_class, method_names, register
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .dare import DareLinear, DareTies
from .della import Della, DellaLinear
from .dppa import DPPA
from .linear import Linear, TaskArithmetic
from .model_stock import ModelStock
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
