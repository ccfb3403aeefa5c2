"""``parse_config``: a mergekit YAML (path or dict) into a :class:`~.recipe.MergeRecipe`.

Checks every key before anything is read: a wrong key, value or model reference raises one
:class:`~lightning_merge.errors.ConfigError` naming the YAML key and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..methods.yaml_spec import REQUIRED
from ..yaml_io import load_yaml
from .layered import LayeredRecipe
from .params import (
    MERGEKIT_METHODS,
    REQUIRED_HINTS,
    UNSUPPORTED_MERGEKIT,
    Resolver,
    blame,
    build_method,
    check_param_names,
    spec_for,
)
from .recipe import MergeRecipe, tensor_names
from .refs import Entry, PathResolver, is_adapter, model_entries, resolve_base
from .settings import MergekitTensorParams, check_setting, tensor_dependent
from .slices import parse_slices
from .tokenizer import parse_tokenizer

log = logging.getLogger(__name__)

__all__ = ["MERGEKIT_METHODS", "TOP_LEVEL_KEYS", "UNSUPPORTED_MERGEKIT", "parse_config"]

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "seed", "slices", "modules", "dialect",
)


def parse_config(config: Mapping[str, Any] | str | os.PathLike) -> MergeRecipe | LayeredRecipe:
    """Parse a mergekit YAML (a path or an already-loaded dict) into a :class:`MergeRecipe`
    (or, for layer-range ``slices:``, a :class:`~lightning_merge.mergekit.layered.LayeredRecipe`).

    Raises :class:`ConfigError` naming the YAML key at fault and what would fix it. Reads no
    tensors; relative model paths are resolved against the working directory, then against the
    YAML file's folder.
    """
    source = config_dir = None
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        config_dir = Path(config).resolve().parent
        config = load_yaml(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(config).__name__}")
    return _parse(dict(config), PathResolver(config_dir), source)


def _parse(cfg: dict[str, Any], paths: PathResolver, source: str | None) -> Any:
    unknown = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key; valid keys: {list(TOP_LEVEL_KEYS)}")
    if cfg.get("modules"):
        raise ConfigError("modules: per-module merges are not supported yet; use 'models:' or 'slices:'")
    if cfg.get("slices"):
        parsed = parse_slices(cfg, paths, lambda sub: _parse(sub, paths, source), source)
        if not isinstance(parsed, dict):
            return parsed
        cfg = parsed
    if not isinstance(cfg.get("merge_method"), str):
        raise ConfigError("merge_method: missing; e.g. 'merge_method: ties'")
    spec = spec_for(cfg["merge_method"], cfg.get("dialect", "mergekit"))
    out_dtype = _dtype(cfg)
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")

    base_ref = resolve_base(cfg.get("base_model"), paths)
    entries, is_base = model_entries(cfg.get("models"), base_ref, paths)
    tokenizer = parse_tokenizer(cfg, paths, base_ref, [e.path for e in entries])
    gparams = cfg.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        raise ConfigError("parameters: expected a mapping of parameter -> value")
    gparams = dict(gparams)
    for pk, pv in gparams.items():
        check_setting(pv, f"parameters.{pk}")
    check_param_names(spec, gparams, entries)

    # ---- which inputs are experts, and which model is our base
    if spec.base == "input":  # mergekit linear: base_model is just one more input
        experts = list(entries)
        notes: list[str] = []
        if base_ref is not None and not any(is_base):
            experts.append(Entry(base_ref, {}, "base_model"))
            weight = (" (weight: the global 'parameters.weight', default 1.0)" if "weight" in spec.params
                      else "")
            notes.append(
                f"{spec.name}: base_model is averaged as one more input, as in mergekit{weight}; drop "
                "base_model to average only the listed models"
            )
        donor = base_ref
        if donor is None:
            plain = [e.path for e in experts if not is_adapter(e.path)]
            if len(plain) < len(experts):
                raise ConfigError("base_model: adapter models need the base model they were trained on; "
                                  "add 'base_model: PATH'")
            donor = plain[0]
    else:
        notes = []
        if base_ref is None and spec.base == "required":
            raise ConfigError(
                f"base_model: '{spec.name}' needs base_model (the pre-trained model the others were "
                "fine-tuned from); add 'base_model: PATH'"
            )
        experts = [e for e, b in zip(entries, is_base, strict=True) if not b]
        donor = base_ref if base_ref is not None else (experts[0].path if experts else None)
        if base_ref is None and any(is_adapter(e.path) for e in experts):
            raise ConfigError("base_model: adapter models need the base model they were trained on; "
                              "add 'base_model: PATH'")
    n = len(experts)
    if n < spec.min_experts or (spec.max_experts is not None and n > spec.max_experts):
        want = (f"exactly {spec.min_experts}" if spec.max_experts == spec.min_experts
                else f"at least {spec.min_experts}")
        extra = " (slerp interpolates base_model and one other model)" if spec.name == "slerp" else ""
        besides = " besides base_model"
        if spec.base == "input":  # passthrough: base_model is an input (mergekit adds it when not listed)
            besides = ""
            if base_ref is not None and not any(is_base):
                extra += (" (base_model is not one of the listed models, so it is one more input, as in "
                          "mergekit; remove base_model or set it to the listed model)")
            elif spec.name == "passthrough":
                extra += " (passthrough copies one model; 'linear' averages several)"
        raise ConfigError(f"models: '{spec.name}' needs {want} model(s){besides}, got {n}{extra}")
    for pk, p in spec.params.items():
        if p.default is REQUIRED and pk not in gparams and not p.per_model:
            raise ConfigError(f"parameters.{pk}: '{spec.name}' needs '{pk}'"
                              + REQUIRED_HINTS.get(f"{spec.name}.{pk}", REQUIRED_HINTS.get(pk, "")))

    resolver = Resolver(spec, gparams, experts, has_base=base_ref is not None)
    our_name, kwargs, weights = resolver.resolve(None, 0.0, notes)
    try:
        method = build_method(our_name, kwargs, f"merge_method '{spec.name}'")
    except ConfigError as e:
        raise ConfigError(f"{e}{blame(str(e), gparams, experts)}") from None
    resolver.validate_candidates()

    settings = [gparams] + [e.params for e in experts]
    tp = None
    if any(tensor_dependent(v) for s in settings for v in s.values()):
        tp = MergekitTensorParams(resolver.per_tensor, names_loader=lambda: tensor_names(donor))
    return MergeRecipe(
        method=method, base=donor, experts=[e.path for e in experts], weights=weights, tensor_params=tp,
        out_dtype=out_dtype, seed=seed, merge_method=spec.name, notes=notes, source=source, tokenizer=tokenizer,
    )



def _dtype(cfg: dict[str, Any]) -> torch.dtype | None:
    from ..api import parse_dtype

    out = None
    for key in ("dtype", "out_dtype"):  # out_dtype wins
        v = cfg.get(key)
        if v is None:
            continue
        try:
            out = parse_dtype(str(v))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


