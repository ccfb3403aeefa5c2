"""Candidate lists for :class:`~lightning_merge.lightning.search.MergeSearch`: grids and random spaces.

Pure Python (no torch, no Lightning): every function here is deterministic and raises
:class:`ConfigError` naming the key at fault, so a search is fully known and validated when the
callback is constructed.

A **grid** is ``{"method": [...], param: [...], ...}``; its candidates are the cartesian product
(a scalar is one choice).

A **space** is ``{"method": [...], param: spec, ..., "weights": spec}`` sampled ``num_samples``
times with ``random.Random(search_seed)``. A hyperparameter spec is

* a scalar: always that value;
* a list: one of its entries, uniformly (an entry may itself be a list, e.g. one value per expert);
* ``{"low": a, "high": b}``: uniform in [a, b); ``{"low": a, "high": b, "log": true}``: log-uniform
  (a > 0).

``weights`` (one per expert) is either a list with one spec per expert (a number or a range), or
``{"dirichlet": concentration, "total": 1.0}``: a Dirichlet sample (``concentration`` one number or
one per expert) scaled to sum to ``total``.

Every key is drawn for every sample, in the order the space lists them (so a sample does not
depend on which method was drawn); a hyperparameter that the drawn method does not have is then
left out of that candidate (e.g. ``epsilon`` for a ``ties`` draw in a ``[ties, della]`` space). A
key that no listed method has is an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..methods.registry import method_class

__all__ = ["check_space", "expand_grid", "method_params", "sample_space"]

RANGE_KEYS = frozenset({"low", "high", "log"})
DIRICHLET_KEYS = frozenset({"dirichlet", "total"})


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid`` (each value a list of choices; a scalar is one choice)."""
    if not isinstance(grid, Mapping):
        raise ConfigError(f"MergeSearch: grid must be a dict of lists, got {type(grid).__name__}")
    if "method" not in grid:
        raise ConfigError("MergeSearch: grid needs a 'method' key (a list of method names)")
    keys = list(grid)
    choices = [list(v) if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    for k, c in zip(keys, choices):
        if not c:
            raise ConfigError(f"MergeSearch: grid['{k}'] is empty")
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def method_params(name: str) -> set[str]:
    """The hyperparameter names of method ``name`` (``lambda_`` also as ``lambda``)."""
    names = {f.name for f in dataclasses.fields(method_class(name))}
    return names | ({"lambda"} if "lambda_" in names else set())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(where: str, spec: Mapping[str, Any]) -> None:
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise ConfigError(f"MergeSearch: {where} has unknown key(s) {unknown}; a range is "
                          "{low: a, high: b} with optional log: true")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"MergeSearch: {where} needs both 'low' and 'high'")
    low, high = spec["low"], spec["high"]
    if not _number(low) or not _number(high):
        raise ConfigError(f"MergeSearch: {where}: low and high must be finite numbers, got {low!r}, {high!r}")
    if not low < high:
        raise ConfigError(f"MergeSearch: {where}: low ({low}) must be below high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"MergeSearch: {where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"MergeSearch: {where}: a log range needs low > 0, got {low}")


def _check_spec(where: str, spec: Any) -> None:
    if isinstance(spec, Mapping):
        _check_range(where, spec)
    elif isinstance(spec, (list, tuple)) and not spec:
        raise ConfigError(f"MergeSearch: {where} is an empty list of choices")


def _check_weights(spec: Any, n_experts: int) -> None:
    where = "space['weights']"
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - DIRICHLET_KEYS)
        if unknown or "dirichlet" not in spec:
            raise ConfigError(f"MergeSearch: {where} must be a list with one spec per expert or "
                              f"{{dirichlet: concentration, total: 1.0}}; unknown or missing key(s) in "
                              f"{sorted(spec)}")
        conc = spec["dirichlet"]
        values = list(conc) if isinstance(conc, (list, tuple)) else [conc]
        if isinstance(conc, (list, tuple)) and len(values) != n_experts:
            raise ConfigError(f"MergeSearch: {where}['dirichlet'] has {len(values)} values for "
                              f"{n_experts} experts")
        if not values or not all(_number(v) and v > 0 for v in values):
            raise ConfigError(f"MergeSearch: {where}['dirichlet'] must be positive numbers, got {conc!r}")
        total = spec.get("total", 1.0)
        if not _number(total) or total <= 0:
            raise ConfigError(f"MergeSearch: {where}['total'] must be a positive number, got {total!r}")
        return
    if not isinstance(spec, (list, tuple)) or len(spec) != n_experts:
        raise ConfigError(f"MergeSearch: {where} must be a list with one spec per expert ({n_experts}) or "
                          f"{{dirichlet: ...}}, got {spec!r}")
    for i, s in enumerate(spec):
        if isinstance(s, Mapping):
            _check_range(f"{where}[{i}]", s)
        elif not _number(s):
            raise ConfigError(f"MergeSearch: {where}[{i}] must be a number or a range, got {s!r}")


def check_space(space: Mapping[str, Any], n_experts: int) -> list[str]:
    """Validate a random-search space (see the module docstring); returns its method names."""
    if not isinstance(space, Mapping):
        raise ConfigError(f"MergeSearch: space must be a dict, got {type(space).__name__}")
    if "method" not in space:
        raise ConfigError("MergeSearch: space needs a 'method' key (a method name or a list of them)")
    methods = space["method"]
    methods = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    if not methods or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"MergeSearch: space['method'] must be a non-empty list of method names, "
                          f"got {space['method']!r}")
    known: set[str] = set()
    for m in methods:
        try:
            known |= method_params(m)
        except ConfigError as e:
            raise ConfigError(f"MergeSearch: space['method']: {e}") from None
    for key, spec in space.items():
        if key == "method":
            continue
        if key == "weights":
            _check_weights(spec, n_experts)
            continue
        if key not in known:
            raise ConfigError(f"MergeSearch: space['{key}']: none of the methods {methods} has a parameter "
                              f"'{key}'; valid parameters: {sorted(known)}")
        _check_spec(f"space['{key}']", spec)
    return methods


def _draw(rng: random.Random, spec: Any) -> Any:
    if isinstance(spec, Mapping):
        low, high = float(spec["low"]), float(spec["high"])
        u = rng.random()
        if spec.get("log", False):
            return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return low + u * (high - low)
    if isinstance(spec, (list, tuple)):
        return spec[rng.randrange(len(spec))]
    return spec


def _draw_weights(rng: random.Random, spec: Any, n_experts: int) -> list[float]:
    if isinstance(spec, Mapping):
        conc = spec["dirichlet"]
        alphas = [float(c) for c in conc] if isinstance(conc, (list, tuple)) else [float(conc)] * n_experts
        g = [rng.gammavariate(a, 1.0) for a in alphas]
        total = float(spec.get("total", 1.0))
        s = math.fsum(g)
        return [total * x / s for x in g] if s > 0 else [total / n_experts] * n_experts
    return [float(_draw(rng, s)) for s in spec]


def sample_space(space: Mapping[str, Any], num_samples: int, seed: int, n_experts: int) -> list[dict[str, Any]]:
    """``num_samples`` candidates drawn from ``space`` with ``random.Random(seed)`` (validated first).

    The same (space, num_samples, seed, n_experts) always gives the same list.
    """
    check_space(space, n_experts)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ConfigError(f"MergeSearch: num_samples must be a positive int, got {num_samples!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_samples):
        drawn: dict[str, Any] = {}
        for key, spec in space.items():
            drawn[key] = _draw_weights(rng, spec, n_experts) if key == "weights" else _draw(rng, spec)
        params = method_params(drawn["method"])
        out.append({k: v for k, v in drawn.items() if k in ("method", "weights") or k in params})
    return out
