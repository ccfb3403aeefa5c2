"""How a method is written in a mergekit YAML: its parameters there and their translation to ours.

A method class that has a mergekit 0.1.5 counterpart carries a :class:`MergekitSpec` as its
``mergekit`` class attribute: the YAML parameter names with mergekit's scopes and defaults, and a
``translate`` function from mergekit's semantics to the class's keyword arguments. The YAML reader
(:mod:`lightning_merge.mergekit`) builds its table from the registry; nothing else lists
methods. Pure data and small functions: no tensors, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

__all__ = ["REQUIRED", "Contract", "MergekitSpec", "Translate", "YamlParam", "collapse", "gta_params", "rescale_mode"]

#: the default of a parameter the YAML must give
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()

#: (shared values, per-model values, notes to log) -> (our method name, its keyword arguments)
Translate = Callable[[dict[str, Any], dict[str, list[Any]], list[str]], tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class YamlParam:
    """One YAML parameter: its kind ("float", "bool", "any"), mergekit's default, and whether it
    may be set per model (mergekit's NON_BASE / INPUT scope) or only globally (SHARED)."""

    kind: str
    default: Any
    per_model: bool


@dataclass(frozen=True)
class MergekitSpec:
    """A method's YAML parameters (mergekit 0.1.5 defaults) and their translation to our method.

    Attributes:
        name: the ``merge_method`` name.
        params: YAML parameter -> :class:`YamlParam`.
        base: "required": base_model is the base; "optional": used as the base when given;
            "input": base_model (if given) is one more averaged input (mergekit's linear).
        translate: see :data:`Translate`.
        min_experts, max_experts: models besides base_model.
        native: one of our own methods (our parameter names; only what the YAML gives is passed).
        base_flag: (base "optional") our keyword argument that is set to whether the YAML gives
            ``base_model`` (mergekit's nuslerp and multislerp work on task vectors then, on the
            full weights otherwise); None: none.
    """

    name: str
    params: Mapping[str, YamlParam]
    base: str
    translate: Translate
    min_experts: int = 1
    max_experts: int | None = None
    native: bool = False
    base_flag: str | None = None


def collapse(values: Sequence[Any]) -> Any:
    """One value per expert -> a scalar when all are equal, else a list."""
    vals = list(values)
    return vals[0] if all(v == vals[0] for v in vals) else vals


def gta_params(normalize: bool, rescale: bool, extra: Mapping[str, YamlParam] | None = None) -> dict[str, YamlParam]:
    """The parameters of mergekit's generalized task arithmetic family, with its defaults."""
    params = {
        "int8_mask": YamlParam("bool", False, False),
        "normalize": YamlParam("bool", normalize, False),
        "rescale": YamlParam("bool", rescale, False),
        "lambda": YamlParam("float", 1.0, False),
        "weight": YamlParam("float", 1.0, True),  # mergekit: required; we default to 1.0
        "density": YamlParam("float", 1.0, True),
    }
    params.update(extra or {})
    return params


def rescale_mode(shared: Mapping[str, Any]) -> str:
    """mergekit 0.1.5's ``rescale: true`` is L1-norm matching over the tensor."""
    return "l1" if shared["rescale"] else "none"


@dataclass(frozen=True)
class Contract:
    """What the registry-wide contract tests (tests/test_properties.py) need to know of a method.

    Attributes:
        identity: settings under which one expert with weight 1 merges to exactly that expert
            ("nothing dropped"); None when the method has no such setting.
        typical: representative settings for the invariants that hold whatever the values.
        min_experts, max_experts: how many experts a merge takes.
        sums: with ``identity`` settings the method is task arithmetic, θ₀ + λ Σ w δ.
        zero_deltas_give_base: experts equal to the base give the base.
    """

    identity: Mapping[str, Any] | None = None
    typical: Mapping[str, Any] = dataclass_field(default_factory=dict)
    min_experts: int = 1
    max_experts: int | None = None
    sums: bool = False
    zero_deltas_give_base: bool = True
