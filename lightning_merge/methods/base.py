"""The merge-method interface, the registry and hyperparameter validation.

A method is a frozen dataclass of validated hyperparameters plus a pure ``merge`` function over one
tensor name at a time (:class:`TensorInputs` -> merged float32 tensor). Adding a method means one
file in ``lightning_merge/methods/`` with a class decorated by :func:`register`, and one test file.

Spaces. A method declares ``space``:

* ``"delta"``: ``TensorInputs.tensors`` are task vectors δ_t = θ_t − θ₀ (float32). LoRA adapters
  arrive here exactly as ``scaling · B @ A`` with no base round trip.
* ``"weight"``: ``tensors`` are full weights θ_t (soups, SLERP, model stock).

Statistics passes. Methods that need whole-model statistics (adaptive-RMS, DPPA, global TIES) set
``statistics_passes > 0``. The engine then calls ``init_statistics()`` once, ``observe(stats, k,
inputs)`` for every tensor in pass k, ``finish_pass(stats, k)`` after each pass, and finally
``merge(inputs)`` with ``inputs.stats`` set to the returned object. ``observe`` must be
order-independent (it may run on several ranks, each on a share of the tensors, whose statistics
are then combined by ``combine_statistics``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..spaces import Space
from .kernels import generator_for
from .rng import RandomStream, stream_for
from .yaml_spec import Contract, MergekitSpec

PerExpert = float | list[float]


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor name.

    Attributes:
        name: the tensor's key in the base model's naming.
        base: θ₀ in float32 on the compute device, or None when the method needs no base and none
            was given.
        tensors: one float32 tensor per expert that has this tensor (deltas or full weights,
            according to the method's ``space``); experts lacking it are left out (spec §9.2).
            They belong to this call: a method may modify them in place (the engine never hands
            out a source's own storage here). ``base`` must not be modified.
        experts: the global index of each entry of ``tensors`` (for seeding and per-expert values).
        weights: the per-expert weight w_t of each entry of ``tensors``.
        seed: the global seed.
        n_experts: the total number of experts in the merge.
        stats: the object returned by the statistics passes, or None.
    """

    name: str
    base: Tensor | None
    tensors: list[Tensor]
    experts: list[int]
    weights: list[float]
    seed: int = 0
    n_experts: int = 0
    stats: Any = None

    def __post_init__(self) -> None:
        if not self.n_experts:
            self.n_experts = (max(self.experts) + 1) if self.experts else 0

    @property
    def device(self) -> torch.device:
        ref = self.base if self.base is not None else self.tensors[0]
        return ref.device

    def generator(self, i: int) -> torch.Generator:
        """The generator of entry ``i`` (expert ``experts[i]``) for this tensor."""
        return generator_for(self.seed, self.name, self.experts[i], self.device)

    def stream(self, i: int) -> RandomStream:
        """The random stream of entry ``i`` (expert ``experts[i]``) for this tensor (the masks of
        DARE, DELLA and adaptive-RMS: :mod:`~lightning_merge.methods.rng`)."""
        return stream_for(self.seed, self.name, self.experts[i], self.device)

    def single_input(self, method: str) -> Tensor | None:
        """The result when there is nothing to combine (weight-space methods that interpolate the
        experts' weights): the base when no expert has this tensor (an error without one), the one
        expert's tensor when only one has it; None when there are two or more."""
        if not self.tensors:
            if self.base is None:
                raise ConfigError(f"{method}: no model has tensor '{self.name}'")
            return self.base.clone()
        return self.tensors[0] if len(self.tensors) == 1 else None

    def per_expert(self, value: PerExpert, i: int) -> float:
        """Resolve a scalar-or-list hyperparameter for entry ``i``."""
        if isinstance(value, (list, tuple)):
            return float(value[self.experts[i]])
        return float(value)


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    """Base class of every merge method (a frozen dataclass of hyperparameters)."""

    name: ClassVar[str] = ""
    #: the paper or source the method follows (shown in the docs tables)
    reference: ClassVar[str] = ""
    #: how it is written in a mergekit 0.1.5 YAML (None: no mergekit counterpart; then our own
    #: parameter names are accepted under ``merge_method: <name>``)
    mergekit: ClassVar[MergekitSpec | None] = None
    #: the merge of every element depends on that element of the inputs only (no ranking, no norm, no
    #: random stream over the tensor): a sharded merge computes each rank's rows where they live
    elementwise: ClassVar[bool] = False
    #: what the registry-wide contract tests need (identity and typical settings, expert counts)
    contract: ClassVar[Contract] = Contract()
    space: ClassVar[Space] = "delta"
    requires_base: ClassVar[bool] = True
    #: False for methods whose sign election or probabilities assume non-negative weights
    allow_negative_weights: ClassVar[bool] = True
    statistics_passes: ClassVar[int] = 0
    #: hyperparameters that may be a list with one value per expert
    per_expert_params: ClassVar[tuple[str, ...]] = ()

    def merge(self, inputs: TensorInputs) -> Tensor:
        """Return the merged full tensor (float32, on ``inputs.device``)."""
        raise NotImplementedError

    def merge_delta(self, inputs: TensorInputs) -> Tensor:
        """The merged task vector θ* − θ₀ (float32), for outputs that store deltas (a PEFT
        adapter). Default: :meth:`merge` minus the base; the task-arithmetic family returns its
        λ · combine(δ) directly, without adding θ₀ and subtracting it again."""
        if inputs.base is None:
            raise ConfigError(f"{self.name}: a merged delta needs the base model; pass base=...")
        base = inputs.base
        return self.merge(inputs).sub_(base)

    # statistics protocol (methods with statistics_passes > 0 override these)
    def init_statistics(self) -> Any:
        return None

    def observe(self, stats: Any, pass_index: int, inputs: TensorInputs) -> None:
        return None

    def finish_pass(self, stats: Any, pass_index: int) -> Any:
        return stats

    def combine_statistics(self, parts: list[Any], pass_index: int) -> Any:
        """Combine what several workers observed in pass ``pass_index`` (each on a share of the
        tensors, each starting from the same state) into one state. Default: dict union of the
        per-tensor entries, which suits statistics keyed by tensor name."""
        out: dict = {}
        for p in parts:
            out.update(p or {})
        return out

    def check_experts(self, n_experts: int) -> None:
        """Validate per-expert list lengths against the number of experts (before any output)."""
        for pname in self.per_expert_params:
            value = getattr(self, pname)
            if isinstance(value, (list, tuple)) and len(value) != n_experts:
                raise ConfigError(
                    f"{self.name}: parameter '{pname}' has {len(value)} values but the merge has "
                    f"{n_experts} experts; give one value per expert or a single number."
                )

    def with_params(self, **params: Any) -> MergeMethod:
        """A copy with some hyperparameters replaced (validated again)."""
        return dataclasses.replace(self, **params)

    def describe(self) -> dict[str, Any]:
        """The method name and its hyperparameters, for logs and config hashes."""
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True, kw_only=True)
class DeltaMethod(MergeMethod):
    """A method of the task-arithmetic family: θ* = θ₀ + λ · combine(δ_1..δ_T).

    Attributes:
        lambda_: λ, the global scale applied after combining (YAML: ``lambda``).
    """

    lambda_: float = 1.0

    def __post_init__(self) -> None:
        check_finite(self.name, "lambda_", self.lambda_)

    def combine(self, inputs: TensorInputs) -> Tensor:
        raise NotImplementedError

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model to compute task vectors; pass base=...")
        if not inputs.tensors:
            return inputs.base.clone()
        # combine() returns a new tensor or one of the method's own inputs: finish it in place
        return self.combine(inputs).mul_(self.lambda_).add_(inputs.base)

    def merge_delta(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model to compute task vectors; pass base=...")
        if not inputs.tensors:
            return torch.zeros_like(inputs.base)
        return self.combine(inputs).mul_(self.lambda_)


def explain(*classes: type[MergeMethod], math: str | None) -> None:
    """Put a family's math (its module docstring, ``math``) and the attributes each class inherits
    (``lambda_`` from :class:`DeltaMethod`, a family base's shared ones) into each class docstring,
    so that ``help(Ties)`` explains every parameter."""
    import textwrap

    for cls in classes:
        inherited = [textwrap.dedent(b.__doc__).split("Attributes:", 1)[1].strip("\n")
                     for b in cls.__mro__[1:]
                     if issubclass(b, MergeMethod) and b is not MergeMethod and "Attributes:" in (b.__doc__ or "")]
        parts = [textwrap.dedent(cls.__doc__ or "").strip(), textwrap.dedent(math or "").strip()]
        if inherited:
            parts.append("Inherited attributes:\n" + "\n".join(inherited))
        cls.__doc__ = "\n\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------------- validation

def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_finite(method: str, pname: str, value: Any) -> None:
    for v in _values(value):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{method}: parameter '{pname}' must be a finite number, got {v!r}")


def check_range(
    method: str,
    pname: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
) -> None:
    """Raise :class:`ConfigError` unless every value lies in the interval (lo|[lo, hi]|hi)."""
    check_finite(method, pname, value)
    for v in _values(value):
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if not (ok_lo and ok_hi):
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ConfigError(
                f"{method}: parameter '{pname}' = {v} is outside {interval}" + (f"; {hint}" if hint else "")
            )


def check_choice(method: str, pname: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{method}: parameter '{pname}' = {value!r} is not one of {list(choices)}")


def check_weights(method: str, weights: Sequence[float], *, allow_negative: bool) -> None:
    """Validate per-expert weights (finite; non-negative where the method forbids negatives)."""
    check_finite(method, "weights", list(weights))
    if not allow_negative and any(w < 0 for w in weights):
        raise ConfigError(
            f"{method}: negative weights {list(weights)} are not allowed for this method; "
            "use non-negative weights or a method of the task-arithmetic family"
        )


__all__ = [
    "DeltaMethod",
    "MergeMethod",
    "TensorInputs",
    "check_choice",
    "check_finite",
    "check_range",
    "check_weights",
]
