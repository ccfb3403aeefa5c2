"""mergekit's parameter settings: scalars, layer gradients and filters, evaluated per tensor.

A setting is a scalar, a list of scalars (a gradient over the layers: interpolated at the tensor's
position ``t`` in its layer stack) or a list of ``{filter, value}`` entries (the first whose
``filter`` is a substring of the tensor name wins), exactly as mergekit 0.1.5's
``config.evaluate_setting``. Pure functions apart from :class:`MergekitTensorParams`' cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..naming import LAYER_RE

__all__ = ["LayerIndex", "MergekitTensorParams", "check_setting", "evaluate_setting", "is_scalar",
           "leaf_values", "tensor_dependent", "validator"]

def is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def validator(kind: str, key: str) -> Callable[[Any], Any]:
    """Coerce a YAML scalar like pydantic's lax mode does (numeric strings, 0/1 booleans)."""

    def as_float(v: Any) -> float:
        if isinstance(v, bool):
            return 1.0 if v else 0.0
        try:
            out = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {v!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {v!r}")
        return out

    def as_bool(v: Any) -> bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "t", "y", "1"):
            return True
        if isinstance(v, str) and v.strip().lower() in ("false", "no", "off", "f", "n", "0"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {v!r}")

    def as_any(v: Any) -> Any:
        return v

    return {"float": as_float, "bool": as_bool}.get(kind, as_any)


def check_setting(setting: Any, key: str) -> None:
    """Raise ConfigError unless ``setting`` has mergekit's ParameterSetting shape."""
    if is_scalar(setting):
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list):
        if all(is_scalar(e) for e in setting):
            return
        if not all(isinstance(c, Mapping) for c in setting):
            raise ConfigError(
                f"{key}: a list must hold only numbers (a gradient over layers) or only "
                f"{{filter: ..., value: ...}} entries, got {setting!r}"
            )
        for i, cond in enumerate(setting):
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown or "value" not in cond:
                raise ConfigError(
                    f"{key}[{i}]: a conditional entry needs 'value' and optionally 'filter' "
                    f"(a substring of the tensor name), got keys {sorted(cond)}"
                )
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ConfigError(f"{key}[{i}].filter: must be a string, got {cond['filter']!r}")
            v = cond["value"]
            if not (is_scalar(v) or (isinstance(v, list) and all(is_scalar(e) for e in v))):
                raise ConfigError(f"{key}[{i}].value: must be a scalar or a list of numbers, got {v!r}")
        return
    if setting is None:
        raise ConfigError(f"{key}: has no value; give a number, a list or remove the key")
    raise ConfigError(f"{key}: unexpected value {setting!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float, validate: Callable[[Any], Any]) -> Any:
    """mergekit 0.1.5 ``config.evaluate_setting``: resolve filters and gradients for one tensor.

    Returns None when a list of filters has no entry matching ``tensor_name``.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if is_scalar(setting):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(is_scalar(e) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t, validate)
    return None


def leaf_values(setting: Any) -> list[Any]:
    """Every scalar a setting can produce (gradient endpoints included)."""
    if is_scalar(setting):
        return [setting]
    if isinstance(setting, Mapping):
        setting = [setting]
    out: list[Any] = []
    for e in setting:
        out.extend(leaf_values(e["value"]) if isinstance(e, Mapping) else [e])
    return out


def tensor_dependent(setting: Any) -> bool:
    """True when the value can differ between tensors (a gradient or a filter)."""
    if is_scalar(setting):
        return False
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(is_scalar(e) for e in setting):
        return len(set(map(repr, setting))) > 1
    conds = list(setting)
    if len(conds) == 1 and conds[0].get("filter") in (None, "*"):
        return tensor_dependent(conds[0]["value"])
    return True


# ------------------------------------------------------------------------------------- layer index



class LayerIndex:
    """Maps a tensor name to mergekit's gradient position ``t``.

    A name like ``model.layers.5.mlp.up_proj.weight`` is layer 5 of the stack ``model.layers``; with
    N layers in that stack (the largest index + 1 among the base model's names), ``t = 5/(N-1)``
    (``t = 1`` when N = 1). Names outside any layer stack get ``t = 0`` (mergekit plans embeddings,
    the final norm and the head with t = 0).
    """

    def __init__(self, names: Sequence[str]):
        self.counts: dict[str, int] = {}
        for n in names:
            m = LAYER_RE.match(n)
            if m:
                self.counts[m.group(1)] = max(self.counts.get(m.group(1), 0), int(m.group(2)) + 1)

    def t(self, name: str) -> float:
        m = LAYER_RE.match(name)
        if not m:
            return 0.0
        n = self.counts.get(m.group(1), int(m.group(2)) + 1)
        return int(m.group(2)) / (n - 1) if n > 1 else 1.0


# ----------------------------------------------------------------------------- per-tensor resolver

class MergekitTensorParams:
    """The engine's ``tensor_params``: ``name -> {our param: value, "weights": [...]}``.

    Resolves every parameter for one tensor with mergekit's precedence (per-model → global →
    default), filters and layer gradients, then translates to our method's parameters. Needs the
    layer counts (:class:`LayerIndex`) when a gradient is used: set :attr:`layer_index`, or give
    ``names_loader`` (called once, returns the base model's tensor names).
    """

    def __init__(
        self,
        resolve: Callable[[str, float], tuple[dict[str, Any], list[float]]],
        *,
        layer_index: LayerIndex | None = None,
        names_loader: Callable[[], Sequence[str]] | None = None,
    ):
        self._resolve = resolve
        self.layer_index = layer_index
        self._names_loader = names_loader
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str) -> dict[str, Any]:
        hit = self._cache.get(name)
        if hit is None:
            if self.layer_index is None:
                self.layer_index = LayerIndex(self._names_loader() if self._names_loader else [])
            params, weights = self._resolve(name, self.layer_index.t(name))
            hit = {**params, "weights": weights}
            self._cache[name] = hit
        return dict(hit)


