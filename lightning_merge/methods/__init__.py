"""Merge methods: one family per module, registered by name (mergekit's snake_case names).

Every built-in method class (:data:`~lightning_merge.methods.registry.BUILTIN`) is exported here
under its class name (``Ties``, ``NuSlerp``, ...): adding a method to the registry exports it."""

from .base import DeltaMethod, MergeMethod, TensorInputs
from .registry import BUILTIN, get_method, method_class, method_names, register

#: class name -> class of every built-in method
METHOD_CLASSES = {cls.__name__: cls for cls in BUILTIN}
globals().update(METHOD_CLASSES)

__all__ = sorted(METHOD_CLASSES) + ["METHOD_CLASSES", "DeltaMethod", "MergeMethod", "TensorInputs", "get_method",
                                    "method_class", "method_names", "register"]
