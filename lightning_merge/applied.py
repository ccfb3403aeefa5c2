"""What a parsed recipe will actually apply, tensor by tensor, in a few readable lines.

A recipe's method shows the values for tensors that no filter or gradient touches; with
gradients (``density: [1, 0.7, 0.1]``) or filters (``- filter: self_attn``) the values differ by
layer and by module. :func:`applied_values` resolves every tensor's parameters and reports the
constant ones once and each varying one per layer (and, inside a layer, per module where the
values differ), so that what is printed is what the merge does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .naming import layer_of, module_of

__all__ = ["applied_values"]



def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _where(name: str) -> tuple[int | None, str]:
    """(layer index or None, the module group): ``model.layers.3.self_attn.q_proj.weight`` ->
    (3, 'self_attn'); ``model.embed_tokens.weight`` -> (None, 'model.embed_tokens')."""
    hit = layer_of(name)
    if hit:
        return hit[1], hit[2].split(".")[0]
    return None, module_of(name)


def _per_layer(values: dict[str, str]) -> str:
    layers: dict[int | None, dict[str, list[str]]] = {}
    for name, v in values.items():
        layer, group = _where(name)
        by_value = layers.setdefault(layer, {})
        groups = by_value.setdefault(v, [])
        if group not in groups:
            groups.append(group)
    parts = []
    for layer in sorted(layers, key=lambda x: (x is None, x if x is not None else 0)):
        by_value = layers[layer]
        label = f"layer {layer}" if layer is not None else "outside the layers"
        if len(by_value) == 1:
            parts.append(f"{label}: {next(iter(by_value))}")
        else:
            parts.append(f"{label}: " + ", ".join(f"{v} ({' '.join(g)})" for v, g in by_value.items()))
    return "; ".join(parts)


def applied_values(recipe: Any, names: Sequence[str]) -> list[str]:
    """Lines describing the parameters ``recipe`` (a
    :class:`~lightning_merge.mergekit.MergeRecipe`) applies to the tensors ``names``: one
    line with the values every tensor gets, then one line per parameter that varies.

    Per-expert values are shown as lists in the order of ``recipe.experts``."""
    method = recipe.method
    fixed = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    fixed["weights"] = list(recipe.weights)
    if recipe.tensor_params is None or not names:
        return ["every tensor: " + ", ".join(f"{k}={_fmt(v)}" for k, v in fixed.items())]
    recipe.check_tensors(names)
    per_name = {}
    for n in names:
        values = dict(fixed)
        values.update(recipe.tensor_params(n))
        per_name[n] = {k: _fmt(v) for k, v in values.items()}
    keys = list(dict.fromkeys(k for v in per_name.values() for k in v))
    constant = [k for k in keys if len({v.get(k) for v in per_name.values()}) == 1]
    lines = ["every tensor: " + ", ".join(f"{k}={per_name[names[0]][k]}" for k in constant)]
    for k in keys:
        if k not in constant:
            lines.append(f"{k} per layer: " + _per_layer({n: v[k] for n, v in per_name.items() if k in v}))
    return lines
