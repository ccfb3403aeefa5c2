"""The one list of merge methods. Registering a method is adding its class here.

Every built-in method module is imported explicitly, so a module that fails to import is an
``ImportError``, never a method that silently disappears. ``sens_scaled`` lives with the learned
merges (its factors come from a Lightning calibration pass) and is imported when first asked for, as
are ``regmean`` and ``fisher`` (their statistics come from :mod:`lightning_merge.learned.regmean_collect`);
if that import fails, asking for it raises :class:`~lightning_merge.errors.ConfigError` with the
reason. Applications add their own methods with :func:`~lightning_merge.methods.base.register`.

Each class describes itself: ``name``, ``reference``, ``mergekit`` (its YAML form, or None), its
hyperparameters as dataclass fields with the math in the class docstring, and its capabilities
(``space``, ``requires_base``, ``statistics_passes``, ``per_expert_params``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, TypeVar

from ..errors import ConfigError
from .adaptive_rms import AdaptiveRMS
from .arcee_fusion import ArceeFusion
from .base import MergeMethod
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .dare import DareLinear, DareTies
from .della import Della, DellaLinear
from .dppa import DPPA
from .isotropic import IsoC, IsoCTS
from .karcher import Karcher
from .linear import Linear, TaskArithmetic
from .model_stock import ModelStock
from .multislerp import MultiSlerp
from .nearswap import Nearswap
from .nuslerp import NuSlerp
from .passthrough import Passthrough
from .ram import Ram
from .ramplus_tl import RamPlusTL
from .sce import Sce
from .slerp import Slerp
from .ties import Ties
from .tsv import TSVM
from .yaml_spec import MergekitSpec

__all__ = ["BUILTIN", "LAZY", "MERGEKIT_0_1_5", "get_method", "load_lazy", "mergekit_specs", "method_class",
           "method_names", "register"]

_REGISTRY: dict[str, type[MergeMethod]] = {}
M = TypeVar("M", bound=type[MergeMethod])


def register(cls: M) -> M:
    """Make a method available to :func:`get_method` under ``cls.name`` (the built-in methods are
    listed in :mod:`lightning_merge.methods.registry`; applications register their own with this)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"merge method name '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method name (including those imported on first use)."""
    return sorted(set(_REGISTRY) | set(LAZY))


def method_class(name: str) -> type[MergeMethod]:
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _REGISTRY and load_lazy(key) is None:
        raise ConfigError(f"unknown merge method '{name}'; known methods: {', '.join(method_names())}")
    return _REGISTRY[key]


def get_method(name: str, **params: Any) -> MergeMethod:
    """Build a registered method by its (mergekit-style, snake_case) name.

    ``lambda`` is accepted as an alias of ``lambda_``. Unknown parameters raise
    :class:`ConfigError` listing the valid ones.
    """
    cls = method_class(name)
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ConfigError(
            f"merge method '{cls.name}' has no parameter(s) {unknown}; valid parameters: {sorted(valid)}"
        )
    return cls(**params)



BUILTIN: tuple[type[MergeMethod], ...] = (
    Linear, TaskArithmetic, Ties, DareLinear, DareTies, Della, DellaLinear, Breadcrumbs, BreadcrumbsTies,
    AdaptiveRMS, DPPA, ModelStock, Slerp,
    NuSlerp, MultiSlerp, Karcher,
    Ram, RamPlusTL, Passthrough,
    Sce, Nearswap, ArceeFusion,
    TSVM, IsoC, IsoCTS,
)
#: name -> (module, class) imported on first use
LAZY: dict[str, tuple[str, str]] = {"sens_scaled": ("lightning_merge.learned.sens_callback", "SensScaled"),
                                    "regmean": ("lightning_merge.learned.regmean_methods", "RegMean"),
                                    "fisher": ("lightning_merge.learned.regmean_methods", "Fisher")}
#: every merge_method of mergekit 0.1.5 (those no class here claims are "not supported yet")
MERGEKIT_0_1_5 = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "model_stock", "passthrough", "nuslerp", "multislerp", "karcher", "sce", "nearswap",
    "arcee_fusion", "ram", "ramplus_tl",
)

for _cls in BUILTIN:
    register(_cls)


def load_lazy(name: str) -> type[MergeMethod] | None:
    """The class of a lazily imported method, imported now (None: not a lazy name)."""
    if name not in LAZY:
        return None
    module, attr = LAZY[name]
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise ConfigError(f"merge method '{name}' could not be imported from {module} ({type(e).__name__}: {e}); "
                          "fix that installation (e.g. its optional dependencies)") from e
    if _REGISTRY.get(name) is not cls:
        register(cls)
    return cls


def mergekit_specs() -> dict[str, tuple[type[MergeMethod], MergekitSpec]]:
    """mergekit ``merge_method`` name -> (our class, its spec), from the registered classes."""
    return {cls.mergekit.name: (cls, cls.mergekit) for cls in dict.fromkeys(_REGISTRY.values())
            if cls.mergekit is not None}
