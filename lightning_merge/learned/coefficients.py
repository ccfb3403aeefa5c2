"""Merge coefficients of the learned merges: layout, parametrization and the merged tensors.

Granularities (N experts; M = N, or N + 1 with ``include_base``, models in weight space):

* ``"task"`` (task-wise AdaMerging): one λ_m per expert, delta space: θ* = θ₀ + Σ_m λ_m δ_m.
* ``"tensor"`` (layer-wise AdaMerging, FusionBench): λ of shape (experts, tensors), one per
  expert and parameter tensor k: θ*_k = θ₀,k + Σ_m λ_{m,k} δ_{m,k}.
* ``"column"`` (DAM, spec §8.1): weight space, θ* = Σ_m g(c_m) ⊙ θ_m with θ_m = θ₀ + δ_m:

  | tensor | coefficient per model | init | trained |
  |---|---|---|---|
  | ``nn.Linear`` weight [out, in] (HF ``Conv1D`` [in, out]) | [in], scales input columns | 1/M | yes |
  | ``nn.Linear`` / ``Conv1D`` bias | scalar | ``bias_init``: 1/M (``"uniform"``) or 1.0 (``"sum"``) | yes |
  | ``nn.Embedding`` weight [V, d] | [d] | 1/M | with ``merge_embeddings`` |
  | norm weights / biases (``*Norm*`` modules) | elementwise | 1/M | with ``merge_norms`` |
  | anything else | scalar | 1/M | no |

  Coefficients that are not trained stay at their initial value, so at init the merged model is
  the uniform soup of the M models (with the default ``bias_init="uniform"``; the reference's 1.0,
  ``bias_init="sum"``, starts every bias as the *sum* of the models' biases, which on real MiniLM
  experts starts — and ends, after 150 steps — below every static merge: issue 17's measurement).

The effective coefficient is c = clamp(g(p)) of the raw parameter p, with g one of ``identity``,
``tanh``, ``sigmoid``, ``relu`` or ``softmax`` (over the models, so Σ_m c_m = 1 at every position)
and an optional clamp to [lo, hi]. ``init`` is the *effective* initial value: the raw value is
g⁻¹(init) (softmax always starts uniform, 1/M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .bank import ExpertBank, safe_key
from .combine import combine, reduce_to

Granularity = Literal["task", "tensor", "column"]
CoefficientFn = Literal["identity", "tanh", "sigmoid", "relu", "softmax"]
Kind = Literal["linear", "bias", "embedding", "norm", "other"]

__all__ = ["Coefficients", "Slot", "classify", "raw_init"]


@dataclass(frozen=True)
class Slot:
    """How one tensor is merged in ``"column"`` granularity."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    #: the tensor dimension the coefficient vector runs along; None: one scalar per model
    axis: int | None
    trainable: bool

    def broadcast_shape(self) -> list[int]:
        b = [1] * len(self.shape)
        if self.axis is not None:
            b[self.axis] = self.shape[self.axis]
        return b

    @property
    def size(self) -> int:
        return self.shape[self.axis] if self.axis is not None else 1


def _kind(module: nn.Module, pname: str) -> tuple[Kind, int | None]:
    cls = type(module).__name__
    if isinstance(module, nn.Linear) or cls == "Conv1D":  # HF Conv1D stores [in, out]
        if pname == "weight":
            return "linear", 1 if isinstance(module, nn.Linear) else 0
        return "bias", None
    if isinstance(module, nn.Embedding) and pname == "weight":
        return "embedding", 1
    if "norm" in cls.lower():
        return "norm", 0
    return "other", None


def classify(target: nn.Module, names: list[str], *, merge_embeddings: bool, merge_norms: bool) -> list[Slot]:
    """The :class:`Slot` of every name in ``names`` (parameters of ``target``)."""
    kinds: dict[str, tuple[Kind, int | None]] = {}
    for mname, module in target.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            kinds.setdefault(f"{mname}.{pname}" if mname else pname, _kind(module, pname))
    out = []
    for n in names:
        shape = tuple(target.get_parameter(n).shape)
        kind, axis = kinds.get(n, ("other", None))
        if axis is not None and axis >= len(shape):
            kind, axis = "other", None
        trainable = kind in ("linear", "bias") or (kind == "embedding" and merge_embeddings) or (
            kind == "norm" and merge_norms)
        out.append(Slot(n, shape, kind, axis, trainable))
    return out


def raw_init(fn: CoefficientFn, value: float, pname: str = "init") -> float:
    """g⁻¹(value): the raw parameter whose effective coefficient is ``value``."""
    if fn in ("identity", "softmax"):
        return value if fn == "identity" else 0.0
    if fn == "relu":
        if value < 0:
            raise ConfigError(f"LearnedMerge: {pname}={value} is negative, which coefficient_fn='relu' cannot "
                              "produce; use a value >= 0 or coefficient_fn='identity'")
        return value
    if fn == "tanh":
        if not -1 < value < 1:
            raise ConfigError(f"LearnedMerge: {pname}={value} is outside (-1, 1), the range of coefficient_fn="
                              "'tanh'; use a smaller value or coefficient_fn='identity'")
        return math.atanh(value)
    if not 0 < value < 1:  # sigmoid
        raise ConfigError(f"LearnedMerge: {pname}={value} is outside (0, 1), the range of coefficient_fn="
                          "'sigmoid'; use a value in (0, 1) or coefficient_fn='identity'")
    return math.log(value / (1 - value))


#: the DAM bias coefficients' start: "uniform" (1/M: the merge starts as the soup), "sum" (1.0 each,
#: the DAM reference: biases summed), or a number
BiasInit = float | Literal["uniform", "sum"]


def bias_value(bias_init: BiasInit, n_models: int) -> float:
    """The effective initial bias coefficient for ``n_models`` models."""
    if bias_init == "uniform":
        return 1.0 / n_models
    if bias_init == "sum":
        return 1.0
    return float(bias_init)


class Coefficients(nn.Module):
    """The trainable coefficients and the merged tensors they define (see the module doc)."""

    def __init__(self, bank: ExpertBank, granularity: Granularity, *, fn: CoefficientFn = "identity",
                 init: float | None = None, clamp: tuple[float, float] | None = None, include_base: bool = False,
                 bias_init: BiasInit = "uniform", merge_embeddings: bool = False, merge_norms: bool = False) -> None:
        super().__init__()
        self.granularity, self.fn, self.clamp = granularity, fn, clamp
        self.names = list(bank.names)
        n = bank.n_experts
        self.include_base = include_base and granularity == "column"
        self.n_models = n + 1 if self.include_base else n
        if granularity == "column":
            self.slots = classify(bank.target, self.names, merge_embeddings=merge_embeddings, merge_norms=merge_norms)
            self.values = nn.ParameterDict()
            start = 1.0 / self.n_models if init is None else init
            bias_start = bias_value(bias_init, self.n_models)
            for s in self.slots:
                if s.trainable:
                    v = raw_init(fn, bias_start if s.kind == "bias" else start,
                                 "bias_init" if s.kind == "bias" else "init")
                    shape = (self.n_models, s.size) if s.axis is not None else (self.n_models,)
                    self.values[safe_key(s.name)] = nn.Parameter(torch.full(shape, v))
            self._fixed = 1.0 / self.n_models
        else:
            self.slots = []
            v = raw_init(fn, 0.3 if init is None else init)
            shape = (n,) if granularity == "task" else (n, len(self.names))
            self.values = nn.ParameterDict({"lambda": nn.Parameter(torch.full(shape, v))})
        self._index = {name: k for k, name in enumerate(self.names)}
        self._slot = {s.name: s for s in self.slots}

    # ---- effective coefficients
    def activate(self, raw: Tensor) -> Tensor:
        """clamp(g(raw)), g over dim 0 (the models) for softmax."""
        fn = self.fn
        c = (raw if fn == "identity" else torch.tanh(raw) if fn == "tanh" else torch.sigmoid(raw)
             if fn == "sigmoid" else torch.relu(raw) if fn == "relu" else torch.softmax(raw, dim=0))
        return c.clamp(*self.clamp) if self.clamp is not None else c

    def effective(self, name: str) -> Tensor:
        """The effective coefficients of tensor ``name``: ``[models]`` or ``[models, size]``."""
        if self.granularity == "task":
            return self.activate(self.values["lambda"])
        if self.granularity == "tensor":
            return self.activate(self.values["lambda"])[:, self._index[name]]
        slot = self._slot[name]
        key = safe_key(name)
        if key in self.values:
            return self.activate(self.values[key])
        ref = next(iter(self.values.values()), None)
        device = ref.device if ref is not None else None
        shape = (self.n_models, slot.size) if slot.axis is not None else (self.n_models,)
        return torch.full(shape, self._fixed, device=device)

    def trainable_vectors(self) -> list[tuple[str, Tensor]]:
        """(name, effective [models, size]) of the trained column-vector coefficients."""
        return [(s.name, self.effective(s.name)) for s in self.slots
                if s.trainable and s.axis is not None]

    # ---- merged tensors
    def terms(self, bank: ExpertBank, name: str) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """``(C, X, O)`` of equation (1) of :mod:`.combine` for tensor ``name``: θ* = O + Σ_k C_k ⊙ X_k.

        On a sharded bank the X are this rank's rows, and a coefficient vector that runs along the
        rows (a norm weight, an HF ``Conv1D`` weight) is cut to the same rows."""
        idx, parts = bank.deltas(name)
        c = self.effective(name)
        base = bank.base(name)
        ndim = base.dim()
        if self.granularity != "column":
            coeffs = c[idx].reshape(len(idx), *([1] * ndim)) if idx else c[:0]
            return coeffs, list(parts), base
        slot = self._slot[name]
        b = slot.broadcast_shape()
        if slot.axis == 0 and name in bank.rows:
            start, stop = bank.rows[name]
            c, b[0] = c[:, start:stop], stop - start
        c = c.reshape(self.n_models, *b)
        total = c.sum(0, keepdim=True)  # Σ_m c_m multiplies θ₀ (θ_m = θ₀ + δ_m), base coefficient included
        coeffs = torch.cat([total, c[idx]], 0) if idx else total
        return coeffs, [base, *parts], None

    def merged(self, bank: ExpertBank, name: str) -> Tensor:
        """θ* of ``name`` in float32 (differentiable in the coefficients only)."""
        coeffs, parts, offset = self.terms(bank, name)
        return combine(coeffs, parts, offset=offset)

    def pullback(self, bank: ExpertBank, name: str, grad: Tensor) -> Tensor:
        """A scalar whose gradient in the raw coefficients is the chain rule of ∂ℓ/∂θ* = ``grad``
        through θ*(c) (equation (2) of :mod:`.combine`): Σ_k ⟨C_k, reduce(grad ⊙ X_k)⟩ with the
        reductions computed without a graph. Used where the forward ran on parameters that hold θ*
        (a sharded model) instead of on θ*(c) itself."""
        coeffs, parts, _ = self.terms(bank, name)
        if not parts:
            return coeffs.sum() * 0.0
        g = grad.to(torch.float32)
        with torch.no_grad():
            gc = torch.stack([reduce_to(g * x.to(torch.float32), coeffs.shape[1:]) for x in parts])
        return (coeffs * gc).sum()

    def merged_params(self, bank: ExpertBank, names: list[str] | None = None) -> dict[str, Tensor]:
        return {n: self.merged(bank, n) for n in (names or self.names)}

    def table(self) -> dict[str, Tensor]:
        """Effective coefficients per tensor (detached, CPU): ``[models]`` or ``[models, size]``; each
        its own copy (granularity ``"task"`` with ``identity`` would otherwise give every tensor the
        same storage, which safetensors refuses to save)."""
        with torch.no_grad():
            return {n: self.effective(n).detach().float().cpu().clone() for n in self.names}
