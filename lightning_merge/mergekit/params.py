"""Which method a ``merge_method`` names, and its parameters resolved and translated.

mergekit's precedence for one tensor: the model's own ``parameters``, then the global ones, then
the method's default (:func:`resolve_one`); :class:`Resolver` translates the resolved values into
our method's keyword arguments with the method's :class:`~lightning_merge.methods.yaml_spec.MergekitSpec`.
Parameters that mergekit accepts and the method ignores are dropped with one warning
(:func:`check_param_names`); a name no mergekit method knows is an error with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..methods.base import MergeMethod
from ..methods.registry import MERGEKIT_0_1_5, mergekit_specs, method_class
from ..methods.yaml_spec import REQUIRED, MergekitSpec, YamlParam, collapse
from .refs import Entry
from .settings import evaluate_setting, is_scalar, leaf_values, validator

log = logging.getLogger(__name__)

__all__ = ["MERGEKIT_METHODS", "REQUIRED_HINTS", "UNSUPPORTED_MERGEKIT", "Resolver", "blame", "build_method",
           "check_param_names", "spec_for"]

#: mergekit merge_method -> its spec, for the registered classes that have one
MERGEKIT_METHODS: dict[str, MergekitSpec] = {name: spec for name, (_, spec) in mergekit_specs().items()}
#: mergekit 0.1.5's methods that no registered class implements yet
UNSUPPORTED_MERGEKIT = tuple(n for n in MERGEKIT_0_1_5 if n not in MERGEKIT_METHODS)

REQUIRED_HINTS = {"t": " (the interpolation factor: 0 = base_model, 1 = the other model), e.g. "
                        "'parameters: {t: 0.5}'",
                   "nearswap.t": " (the largest step of an entry from base_model toward the other model), "
                                 "e.g. 'parameters: {t: 0.0001}'"}




#: ``dialect:`` values: whose parameter names and defaults the YAML uses
DIALECTS = ("mergekit", "lightning_merge")


def spec_for(merge_method: str, dialect: str = "mergekit") -> MergekitSpec:
    """The spec that reads ``merge_method``'s parameters: mergekit's (names, defaults and semantics
    translated) for a mergekit name, else our own class's; with ``dialect: lightning_merge`` always
    our own (``merge_method: ties`` then takes every :class:`~lightning_merge.methods.Ties` field)."""
    name = merge_method.strip().lower().replace("-", "_")
    if dialect not in DIALECTS:
        raise ConfigError(f"dialect: {dialect!r} is not one of {list(DIALECTS)}; 'lightning_merge' reads our own "
                          "parameter names and defaults, 'mergekit' (the default) mergekit's")
    if dialect == "lightning_merge":
        cls = _ensure_registered(name)
        if cls is None:
            raise ConfigError(f"merge_method: unknown lightning_merge method '{merge_method}'; known: "
                              f"{_all_method_names()}")
        return _native_spec(cls)
    if name in MERGEKIT_METHODS:
        return MERGEKIT_METHODS[name]
    if name in UNSUPPORTED_MERGEKIT:
        raise ConfigError(
            f"merge_method: mergekit's '{name}' is not supported by lightning_merge; supported mergekit "
            f"methods: {sorted(MERGEKIT_METHODS)}"
        )
    cls = _ensure_registered(name)
    if cls is None:
        raise ConfigError(
            f"merge_method: unknown method '{merge_method}'; mergekit methods: {sorted(MERGEKIT_METHODS)}; "
            f"lightning_merge methods: {_all_method_names()}"
        )
    return _native_spec(cls)


def _native_spec(cls: type[MergeMethod]) -> MergekitSpec:
    """One of our own methods, with our parameter names (YAML ``lambda`` is ``lambda_``)."""
    params: dict[str, YamlParam] = {"weight": YamlParam("float", 1.0, True)}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else REQUIRED
        params["lambda" if f.name == "lambda_" else f.name] = YamlParam(
            "any", default, f.name in cls.per_expert_params
        )

    def translate(s: dict[str, Any], pm: dict[str, list[Any]], notes: list[str]) -> tuple[str, dict]:
        kw = {("lambda_" if k == "lambda" else k): v for k, v in s.items()}
        kw.update({k: collapse(v) for k, v in pm.items() if k != "weight"})
        return cls.name, kw

    base = "required" if cls.requires_base else "optional"
    return MergekitSpec(cls.name, params, base, translate, native=True)


def _ensure_registered(name: str) -> type[MergeMethod] | None:
    """Our method class registered as ``name`` (None when there is none)."""
    try:
        return method_class(name) if name else None
    except ConfigError as e:
        if "could not be imported" in str(e):
            raise
        return None


def _all_method_names() -> list[str]:
    from ..methods.registry import method_names

    return method_names()


def build_method(name: str, kwargs: dict[str, Any], where: str) -> MergeMethod:
    cls = _ensure_registered(name)
    if cls is None:
        raise ConfigError(f"merge_method: '{name}' is not available in this installation of lightning_merge")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid parameters for '{name}': {e}") from None



def blame(message: str, gparams: dict[str, Any], experts: list[Entry]) -> str:
    """' [set by: models[0].parameters.epsilon = 0.3, ...]' for the parameters ``message`` names."""
    named = set(re.findall(r"'(\w+)'", message))
    named |= {"lambda" for n in named if n == "lambda_"}
    hits = [f"parameters.{k} = {v!r}" for k, v in gparams.items() if k in named]
    hits += [f"{e.key}.{k} = {v!r}" for e in experts for k, v in e.params.items() if k in named]
    return f" [set by: {', '.join(hits)}]" if hits else " [mergekit's defaults]"


def _mergekit_param_names() -> set[str]:
    """Every parameter name some mergekit 0.1.5 method reads (from the registered specs)."""
    return {k for _, spec in mergekit_specs().values() for k in spec.params}


def _did_you_mean(pk: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(pk, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_param_names(spec: MergekitSpec, gparams: dict[str, Any], entries: list[Entry]) -> None:
    """Refuse a parameter no mergekit method knows (with a did-you-mean); one warning for those
    mergekit accepts and this method ignores (``weight`` on ``slerp``, ``density`` left on a
    ``linear`` model, a global parameter given per model), which are then dropped."""
    per_model = sorted(k for k, p in spec.params.items() if p.per_model)
    known = set() if spec.native else _mergekit_param_names()  # our own methods: mergekit has no say
    ignored: list[str] = []
    for pk in list(gparams):
        if pk not in spec.params:
            if pk not in known:
                raise ConfigError(f"parameters.{pk}: unknown parameter for '{spec.name}'; valid: "
                                  f"{sorted(spec.params)}{_hint(pk) or _did_you_mean(pk, list(spec.params))}")
            ignored.append(f"parameters.{pk}")
            del gparams[pk]
    for e in entries:
        for pk in list(e.params):
            if pk not in spec.params:
                if pk not in known:
                    raise ConfigError(f"{e.key}.{pk}: unknown parameter for '{spec.name}'; valid per-model "
                                      f"parameters: {per_model}{_hint(pk) or _did_you_mean(pk, per_model)}")
                ignored.append(f"{e.key}.{pk}")
                del e.params[pk]
            elif not spec.params[pk].per_model and spec.native:
                raise ConfigError(f"{e.key}.{pk}: '{pk}' is a global parameter of '{spec.name}'; move it to the "
                                  "top-level 'parameters:'")
            elif not spec.params[pk].per_model:
                ignored.append(f"{e.key}.{pk} (a global parameter of '{spec.name}': set it under the top-level "
                               "'parameters:')")
                del e.params[pk]
    if ignored:
        log.warning("'%s' ignores %s, as mergekit does; they have no effect on this merge", spec.name,
                    ", ".join(ignored))


def _hint(pk: str) -> str:
    if pk == "lambda_":
        return "; the YAML spells it 'lambda'"
    if pk in ("rank_scope", "prob_formula", "trim_scope", "trim_rule", "zero_sign", "election", "divisor",
              "extra_trim_density", "dot_threshold", "task_vectors"):
        return ("; it is a lightning_merge option with no mergekit equivalent: set it through the Python API "
                "(lightning_merge.merge_models)")
    if pk == "weights":
        return "; give 'weight' per model"
    if pk == "dim":
        return "; nuslerp spells it 'nuslerp_flatten: false' (rows) with 'nuslerp_row_wise: true' (columns)"
    return ""


def resolve_one(pk: str, p: YamlParam, scopes: Sequence[Mapping[str, Any]], tensor_name: str | None,
                 t: float, key: str) -> Any:
    """mergekit's ``resolve_parameter``: the first scope with a value for this tensor, else the default."""
    validate = validator(p.kind, key)
    for scope in scopes:
        if pk in scope:
            v = evaluate_setting(scope[pk], tensor_name or "", t, validate)
            if v is not None:
                return v
    if p.default is REQUIRED:
        if tensor_name is None:  # the recipe-level method: a value given only under filters
            for scope in scopes:
                if pk in scope:
                    return validate(leaf_values(scope[pk])[0])
        raise ConfigError(f"{key}: no value for tensor '{tensor_name}' (no filter matches it); add a "
                          "final entry without 'filter' as the default")
    return p.default


class Resolver:
    """Resolves and translates one method's parameters, globally or for one tensor."""

    def __init__(self, spec: MergekitSpec, gparams: dict[str, Any], experts: list[Entry], has_base: bool = False):
        self.spec, self.gparams, self.experts = spec, gparams, experts
        self.has_base = has_base  # whether the YAML gives base_model (for spec.base_flag)

    def resolve(
        self,
        tensor_name: str | None,
        t: float,
        notes: list[str] | None = None,
        gparams: dict[str, Any] | None = None,
        per: list[dict[str, Any]] | None = None,
    ) -> tuple[str, dict[str, Any], list[float]]:
        """(our method name, its keyword arguments, the per-expert weights) for one tensor
        (``tensor_name=None``: for tensors that no filter and no gradient touches)."""
        g = self.gparams if gparams is None else gparams
        per = [e.params for e in self.experts] if per is None else per
        shared: dict[str, Any] = {}
        pm: dict[str, list[Any]] = {}
        for pk, p in self.spec.params.items():
            given = pk in g or (p.per_model and any(pk in prm for prm in per))
            if self.spec.native and not given and pk != "weight":
                continue  # our own method: our defaults fill what the YAML leaves out
            if not p.per_model:
                shared[pk] = resolve_one(pk, p, [g], tensor_name, t, f"parameters.{pk}")
            else:
                pm[pk] = [resolve_one(pk, p, [prm, g], tensor_name, t, f"{e.key}.{pk}")
                          for prm, e in zip(per, self.experts, strict=True)]
        weights = [float(w) for w in pm.pop("weight", [1.0] * len(per))]
        name, kwargs = self.spec.translate(shared, pm, notes if notes is not None else [])
        if self.spec.base_flag:
            kwargs[self.spec.base_flag] = self.has_base
        return name, kwargs, weights

    def per_tensor(self, tensor_name: str, t: float) -> tuple[dict[str, Any], list[float]]:
        name, kwargs, weights = self.resolve(tensor_name, t)
        build_method(name, kwargs, f"merge_method '{self.spec.name}'")  # validates the values
        return kwargs, weights

    def validate_candidates(self) -> None:
        """Build the method with each value every setting can take (filter values, gradient
        endpoints), one setting at a time, so that a bad value fails now naming its YAML key."""
        scopes = [("parameters", self.gparams, None)] + [
            (e.key, e.params, i) for i, e in enumerate(self.experts)
        ]
        for prefix, params, idx in scopes:
            for pk, setting in params.items():
                if is_scalar(setting):
                    continue  # already part of the recipe-level method
                p = self.spec.params[pk]
                key = f"{prefix}.{pk}"
                validate = validator(p.kind, key)
                for leaf in leaf_values(setting):
                    g = dict(self.gparams)
                    per = [dict(e.params) for e in self.experts]
                    (g if idx is None else per[idx])[pk] = validate(leaf)
                    name, kwargs, _ = self.resolve(None, 0.0, gparams=g, per=per)
                    build_method(name, kwargs, key)
