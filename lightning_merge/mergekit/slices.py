"""mergekit's ``slices:`` form: validated, then run as ``models:`` (one whole-model slice) or layer by layer.

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

Unlike the ``models:`` form, a ``base_model`` that is none of the slice's sources is not added
as one more input (``linear``, ``passthrough``, ``karcher``): mergekit adds it only to ``models:``.

Every other ``slices:`` config (sub-ranges, several slices: frankenmerges and per-slice merges)
is a layer-range merge: :mod:`lightning_merge.mergekit.layered`. A slice's ``residual_weight`` is
accepted and ignored, as mergekit 0.1.5 ignores it (one warning). Pure config handling: reads only
each source's ``config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LAYER_COUNT_FIELDS", "layer_count", "model_path", "parse_slices", "slices_as_models"]

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


def model_path(model: Any) -> str | None:
    """The model path of a mergekit model reference (``path``, ``path+adapter``, ``{model: path}``)."""
    if isinstance(model, str):
        return model.split("+")[0] if "+" in model and not os.path.exists(model) else model
    if isinstance(model, Mapping) and isinstance(model.get("model"), str):
        return model["model"]
    return None


SliceRanges = list[list[tuple[str, Any, int, int]]]


def _check_slices(cfg: Mapping[str, Any], resolve: Callable[[str], str]) -> SliceRanges:
    """Validate every slice; ``[k] -> [(resolved path, model as written, start, stop)]``."""
    slices = cfg.get("slices")
    if cfg.get("models"):
        raise ConfigError("slices: give either 'models:' or 'slices:', not both (mergekit refuses both)")
    if not isinstance(slices, list) or not slices:
        raise ConfigError("slices: expected a list of slices, each with 'sources:'")
    out: SliceRanges = []
    for k, sl in enumerate(slices):
        where = f"slices[{k}]"
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{where}: expected a mapping with a non-empty 'sources:' list")
        unknown = sorted(set(sl) - {"sources", "parameters", "base_model", "residual_weight"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key; a slice has sources, parameters, base_model, "
                              "residual_weight")
        if sl.get("residual_weight") is not None:
            log.warning("%s.residual_weight is ignored, as mergekit 0.1.5 ignores it", where)
        ranges = []
        for i, src in enumerate(sl["sources"]):
            key = f"{where}.sources[{i}]"
            if not isinstance(src, Mapping) or "model" not in src:
                raise ConfigError(f"{key}: expected a mapping with 'model:' and 'layer_range:'")
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise ConfigError(f"{key}.{extra[0]}: unknown key; a source has model, layer_range, parameters")
            rng = src.get("layer_range")
            if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
                raise ConfigError(f"{key}.layer_range: expected [start, end] (two integers), got {rng!r}")
            path = model_path(src["model"])
            resolved = resolve(path) if path else ""
            n = layer_count(resolved) if path else None
            if n is None:
                raise ConfigError(f"{key}: cannot tell how many layers '{path}' has (no config.json with "
                                  f"{LAYER_COUNT_FIELDS[0]}); a slice needs it")
            a, b = rng
            if not 0 <= a < b <= n:
                raise ConfigError(f"{key}.layer_range: {list(rng)} is not a range of '{path}''s {n} layers; use "
                                  f"[start, end] with 0 <= start < end <= {n} (end excluded)")
            ranges.append((resolved, src["model"], a, b))
        out.append(ranges)
    return out


def parse_slices(cfg: Mapping[str, Any], resolve: Any, parse_models: Callable[[dict], Any],
                 source: str | None = None) -> dict[str, Any] | Any:
    """A ``slices:`` config as a ``models:`` config (one slice of whole models) or as a
    :class:`~lightning_merge.mergekit.layered.LayeredRecipe` (everything else)."""
    ranges = _check_slices(cfg, resolve)
    whole = len(ranges) == 1 and all(a == 0 and b == layer_count(p) for p, _, a, b in ranges[0])
    if whole:
        return slices_as_models(cfg, resolve)
    from .layered import build_layered

    return build_layered(cfg, resolve, parse_models, ranges, source)


def slices_as_models(cfg: Mapping[str, Any], resolve: Callable[[str], str]) -> dict[str, Any]:
    """``cfg`` with its one whole-model slice rewritten as ``models:`` (see the module doc).

    ``resolve`` maps a model path as written to the path to read (relative to the YAML's folder).
    Raises :class:`ConfigError` naming the slice or source at fault."""
    ranges = _check_slices(cfg, resolve)
    if len(ranges) != 1 or not all(a == 0 and b == layer_count(p) for p, _, a, b in ranges[0]):
        raise ConfigError("slices: not one slice of whole models; use parse_slices for layer-range merges")
    sl = cfg["slices"][0]
    models = []
    for src in sl["sources"]:
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
    base = out.get("base_model")
    if base is not None and not any(_same(resolve(model_path(base) or ""), p) for p, _, _, _ in ranges[0]):
        from .params import MERGEKIT_METHODS

        spec = MERGEKIT_METHODS.get(str(cfg.get("merge_method", "")).strip().lower().replace("-", "_"))
        if spec is not None and spec.base == "input":  # mergekit adds an unlisted base only to models:
            del out["base_model"]
    return out


def _same(a: str, b: str) -> bool:
    from .refs import PathResolver

    return PathResolver.same(a, b)
