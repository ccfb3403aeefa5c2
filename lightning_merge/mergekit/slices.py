"""mergekit's ``slices:`` form, as far as it describes whole models.

A mergekit config lists its inputs either as ``models:`` or as ``slices:``, each slice a list of
``sources`` (a model and a ``layer_range``) with optional slice-level ``parameters`` and
``base_model``. mergekit plans ``models:`` as one slice over every layer, so a config whose one
slice takes *every* layer of every source is the same merge as the ``models:`` form with

* each source's ``parameters`` as that model's parameters (highest precedence),
* the slice's ``parameters`` over the top-level ones, key by key (mergekit's
  ``ConfigReader.parameter_sources``: source, then slice, then global),
* the slice's ``base_model`` in place of the top-level one,

and gradients running over the slice's layers, which here are the model's layers. This is how
mergekit's README and most community SLERP / TIES configs are written (``gradient-slerp.yml``).

A slice's ``residual_weight`` is accepted and ignored, as mergekit 0.1.5 ignores it (one
warning). Layer-range slices (a sub-range, several slices, frankenmerges that stack layers) are
refused with a message: they need the renumbered-layer writer, which is not built yet. Pure
config handling: reads only each source's ``config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LAYER_COUNT_FIELDS", "layer_count", "slices_as_models"]

#: config.json fields that give a model's number of layers, in order of preference
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_count(path: str) -> int | None:
    """The number of layers of the model folder ``path`` from its config.json (None: unknown)."""
    cfg = os.path.join(path, "config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    for key in LAYER_COUNT_FIELDS:
        for where in (config, text):
            if isinstance(where.get(key), int):
                return int(where[key])
    return None


def _model_path(model: Any) -> str | None:
    if isinstance(model, str):
        return model.split("+")[0] if "+" in model and not os.path.exists(model) else model
    if isinstance(model, Mapping) and isinstance(model.get("model"), str):
        return model["model"]
    return None


def slices_as_models(cfg: Mapping[str, Any], resolve: Callable[[str], str]) -> dict[str, Any]:
    """``cfg`` with its whole-model ``slices:`` rewritten as ``models:`` (see the module doc).

    ``resolve`` maps a model path as written to the path to read (relative to the YAML's folder).
    Raises :class:`ConfigError` naming the slice or source at fault."""
    slices = cfg.get("slices")
    if cfg.get("models"):
        raise ConfigError("slices: give either 'models:' or 'slices:', not both (mergekit refuses both)")
    if not isinstance(slices, list) or not slices:
        raise ConfigError("slices: expected a list of slices, each with 'sources:'")
    if len(slices) > 1:
        raise ConfigError(f"slices: {len(slices)} slices describe a layer-range merge (layers taken from "
                          "different slices); only one slice covering every layer of its models is supported "
                          "yet. Use one slice with layer_range [0, N] for every source, or 'models:'")
    sl = slices[0]
    if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
        raise ConfigError("slices[0]: expected a mapping with a non-empty 'sources:' list")
    unknown = sorted(set(sl) - {"sources", "parameters", "base_model", "residual_weight"})
    if unknown:
        raise ConfigError(f"slices[0].{unknown[0]}: unknown key; a slice has sources, parameters, base_model, "
                          "residual_weight")
    if sl.get("residual_weight") is not None:
        log.warning("slices[0].residual_weight is ignored, as mergekit 0.1.5 ignores it")
    models = []
    for i, src in enumerate(sl["sources"]):
        key = f"slices[0].sources[{i}]"
        if not isinstance(src, Mapping) or "model" not in src:
            raise ConfigError(f"{key}: expected a mapping with 'model:' and 'layer_range:'")
        extra = sorted(set(src) - {"model", "layer_range", "parameters"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key; a source has model, layer_range, parameters")
        rng = src.get("layer_range")
        if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
            raise ConfigError(f"{key}.layer_range: expected [start, end] (two integers), got {rng!r}")
        path = _model_path(src["model"])
        n = layer_count(resolve(path)) if path else None
        if n is None:
            raise ConfigError(f"{key}: cannot tell how many layers '{path}' has (no config.json with "
                              f"{LAYER_COUNT_FIELDS[0]}); a whole-model slice needs it")
        if list(rng) != [0, n]:
            raise ConfigError(f"{key}.layer_range: {list(rng)} is not the whole model ([0, {n}]); layer-range "
                              "slices (sub-ranges, frankenmerges) are not supported yet")
        entry: dict[str, Any] = {"model": src["model"]}
        if src.get("parameters") is not None:
            entry["parameters"] = src["parameters"]
        models.append(entry)
    out = {k: v for k, v in cfg.items() if k != "slices"}
    out["models"] = models
    if sl.get("base_model") is not None:
        out["base_model"] = sl["base_model"]
    if sl.get("parameters") is not None:
        if not isinstance(sl["parameters"], Mapping):
            raise ConfigError("slices[0].parameters: expected a mapping of parameter -> value")
        out["parameters"] = {**(cfg.get("parameters") or {}), **sl["parameters"]}
    return out
