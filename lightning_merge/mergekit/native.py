"""A merge written back as a YAML that ``lightning-merge merge`` runs: :func:`native_config`.

Any method object (one of ours, or one translated from a mergekit YAML, with settings mergekit
has no name for such as ``trim_rule="official"``) is written in the *native* form:
``dialect: lightning_merge``, ``merge_method`` our registered name (which may equal a mergekit
name: the dialect says whose parameters these are) and the parameters our field names
(``lambda`` for ``lambda_``; a field left at a default of None is omitted); per-expert values
(``density=[0.3, 0.5]``) go under each model's ``parameters`` with its ``weight``. Parsing the
result gives back an equal method (the contract suite checks it for every registered method).
Pure data: no tensors, no files read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..methods.base import MergeMethod

__all__ = ["native_config"]


def _plain(v: Any) -> Any:
    """YAML-safe values: tuples as lists (the classes accept both)."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def native_config(method: MergeMethod, base: str | os.PathLike | None, experts: Sequence[str | os.PathLike],
                  weights: Sequence[float] | None = None, *, seed: int | None = None,
                  out_dtype: str | None = None) -> dict[str, Any]:
    """The YAML mapping (``yaml.safe_dump`` it) that merges ``experts`` into ``base`` with ``method``.

    Every field of the method is written, defaults included, so the file keeps its meaning if a
    default changes. Raises :class:`ConfigError` when ``weights`` or a per-expert list does not
    have one entry per expert."""
    n = len(experts)
    if weights is not None and len(weights) != n:
        raise ConfigError(f"weights: {len(weights)} values for {n} experts")
    shared: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in range(n)]
    for f in dataclasses.fields(method):
        if not f.init:
            continue
        value = getattr(method, f.name)
        if value is None and f.default is None:
            continue
        key = "lambda" if f.name == "lambda_" else f.name
        if f.name in method.per_expert_params and isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ConfigError(f"{method.name}.{f.name}: {len(value)} values for {n} experts")
            for i, v in enumerate(value):
                per_model[i][key] = _plain(v)
        else:
            shared[key] = _plain(value)
    models = []
    for i, e in enumerate(experts):
        params = dict(per_model[i])
        if weights is not None:
            params["weight"] = float(weights[i])
        models.append({"model": os.fspath(e), **({"parameters": params} if params else {})})
    cfg: dict[str, Any] = {"dialect": "lightning_merge", "merge_method": method.name}
    if base is not None:
        cfg["base_model"] = os.fspath(base)
    cfg["models"] = models
    if shared:
        cfg["parameters"] = shared
    if seed is not None:
        cfg["seed"] = int(seed)
    if out_dtype is not None:
        cfg["out_dtype"] = out_dtype
    return cfg
