"""Passthrough: copy one model, optionally scaling tensors (mergekit 0.1.5 ``passthrough``, its
``models:`` form with exactly one model). Weight space, elementwise, no base needed.

For every tensor of the one model θ_1, with s the ``scale`` resolved for that tensor:

    θ* = θ_1          s absent (None): the tensor is copied unchanged, bit for bit
    θ* = s · θ_1      otherwise (s = 0 zeroes the tensor; s may be negative)

``scale`` is usually given per tensor, through mergekit's ``filter:`` lists and layer gradients
(e.g. ``scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]``), which reach the method as
per-tensor parameters. mergekit's other use of passthrough, stacking layer ranges of several
models with ``slices:`` (frankenmerges), is a configuration form, not this method: ``models:``
with more than one model is refused, as mergekit refuses it ("requires exactly 1 inputs"). A
``base_model`` that is not the one model counts as a second input in mergekit, so it is refused
too; a ``base_model`` equal to the model is accepted.

mergekit has no ``weight`` for passthrough; a weight other than 1 is an error here (use
``scale``). mergekit computes s · θ_1 in its ``dtype``; here the product is computed in float32
and rounded once to the output dtype, which gives the same value for 16-bit inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, PerExpert, TensorInputs, check_finite, explain
from .yaml_spec import Contract, MergekitSpec, YamlParam


def _from_mergekit(shared, per_model, notes):
    return "passthrough", {"scale": per_model["scale"][0]}


@dataclass(frozen=True, kw_only=True)
class Passthrough(MergeMethod):
    """Passthrough: θ* = s · θ_1 for the one expert θ_1 (θ_1 itself when ``scale`` is None).

    Attributes:
        scale: the factor s applied to every tensor (a finite number, or a one-element list, one
            value per expert), or None to copy the tensors unchanged (mergekit's default). Per-tensor
            values come from ``tensor_params`` (YAML filters and gradients).
    """

    name = "passthrough"
    elementwise = True
    contract = Contract(identity={}, typical={"scale": 1.0}, min_experts=1, max_experts=1)
    reference = "mergekit's passthrough (Goddard et al. 2024, Arcee's MergeKit, arXiv:2403.13257)"
    mergekit = MergekitSpec("passthrough", {"scale": YamlParam("float", None, True)}, "input",
                            _from_mergekit, 1, 1)
    space = "weight"
    requires_base = False
    per_expert_params = ("scale",)
    scale: PerExpert | None = None

    def __post_init__(self) -> None:
        if self.scale is not None:
            check_finite(self.name, "scale", self.scale)

    def check_experts(self, n_experts: int) -> None:
        if n_experts != 1:
            raise ConfigError(
                f"{self.name}: copies exactly one model, got {n_experts}; to average models use 'linear', to "
                "stack layers of several models use a mergekit 'slices:' configuration"
            )
        super().check_experts(n_experts)

    def merge(self, inputs: TensorInputs) -> Tensor:
        if any(w != 1.0 for w in inputs.weights):
            raise ConfigError(f"{self.name}: a weight {inputs.weights} has no meaning here (mergekit's "
                              "passthrough has none); scale the tensors with 'scale'")
        if not inputs.tensors:
            if inputs.base is None:
                raise ConfigError(f"{self.name}: the model has no tensor '{inputs.name}'")
            return inputs.base.clone()  # only the base has it: copied, as the engine copies extras
        if len(inputs.tensors) != 1:
            raise ConfigError(f"{self.name}: copies exactly one model, got {len(inputs.tensors)} for "
                              f"tensor '{inputs.name}'")
        out = inputs.tensors[0]  # ours to modify (see TensorInputs)
        if self.scale is None:
            return out
        return out.mul_(inputs.per_expert(self.scale, 0))


explain(Passthrough, math=__doc__)

__all__ = ["Passthrough"]
