"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"), spec §4.

Drop And REscale, per element of each expert's task vector, with keep probability d = 1 − p
(``density``; the paper's drop rate is p):

    m_i ~ Bernoulli(d)                  (generator per (seed, tensor, expert))
    δ̂  = m ⊙ δ / d                      (``rescale="inverse_prob"``, the paper)

so E[δ̂] = δ and Var[δ̂_i] = δ_i² p / (1 − p). ``rescale="l1" | "l2" | "linf"`` instead matches the
norm of the whole tensor (mergekit since 2025), ``"none"`` keeps m ⊙ δ. d = 1 is the identity;
d → 0 gives zeros (never 0/0).

* :class:`DareLinear`: θ* = θ₀ + λ Σ_t w_t δ̂_t (÷ Σ w_t with ``normalize``).
* :class:`DareTies`: elect γ on Σ w_t δ̂_t, then the disjoint mean (``normalize=True``, the DELLA
  paper's DARE baseline and our default) or the elected sum (``normalize=False``, mergekit's
  default); ``extra_trim_density`` adds MergeLM's TIES magnitude trim after the drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import DeltaMethod, PerExpert, TensorInputs, check_choice, check_range, explain
from .kernels import (
    Finish,
    RescaleMode,
    ZeroSign,
    bernoulli_keep,
    elect_and_fuse,
    mask_then_match_norm,
    norm_of,
    rescale_to_norm,
    topk_mask,
    unchanged,
    weighted_mean,
    weighted_sum,
)
from .yaml_spec import Contract, MergekitSpec, collapse, gta_params, rescale_mode

RESCALE_MODES = ("inverse_prob", "l1", "l2", "linf", "none")


def dare_drop(
    delta: Tensor, density: float, gen, rescale: RescaleMode = "inverse_prob", *, inplace: bool = False
) -> Tensor:
    """One DARE draw: keep each entry with probability ``density`` and rescale.

    ``inplace=True`` overwrites ``delta`` (saving a tensor-sized copy) unless a norm-matching
    ``rescale`` needs the original norm, which is then computed first.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_() if inplace else delta.new_zeros(delta.shape)
    keep = bernoulli_keep(density, delta, gen)
    if rescale == "inverse_prob":
        return delta.mul_(keep).div_(density) if inplace else delta * keep / density
    if rescale == "none":
        return delta.mul_(keep) if inplace else delta * keep
    original = norm_of(delta, rescale)
    kept = delta.mul_(keep) if inplace else delta * keep
    return rescale_to_norm(kept, original, rescale)


def dare_mask(delta: Tensor, density: float, gen, rescale: RescaleMode = "inverse_prob") -> Finish:
    """:func:`dare_drop` in two parts: the mask is applied to ``delta`` in place now, and the
    returned ``finish(block, start)`` applies the rescale to any flat block of it later (the same operations, so
    ``finish(delta)`` equals ``dare_drop(delta, ...)`` exactly)."""
    if density >= 1.0:
        return unchanged
    if density <= 0.0:
        delta.zero_()
        return unchanged
    keep = bernoulli_keep(density, delta, gen)
    if rescale in ("inverse_prob", "none"):
        delta.mul_(keep)
        return (lambda b, a: b.div_(density)) if rescale == "inverse_prob" else unchanged
    return mask_then_match_norm(delta, keep, rescale)


@dataclass(frozen=True, kw_only=True)
class _Dare(DeltaMethod):
    per_expert_params = ("density",)
    density: PerExpert = 0.5
    rescale: RescaleMode = "inverse_prob"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "density", self.density, 0.0, 1.0, lo_open=True,
                    hint="density = 1 − drop rate is the keep probability")
        check_choice(self.name, "rescale", self.rescale, RESCALE_MODES)

    def dropped(self, inputs: TensorInputs) -> list[Tensor]:
        return [
            dare_drop(d, inputs.per_expert(self.density, i), inputs.stream(i), self.rescale, inplace=True)
            for i, d in enumerate(inputs.tensors)
        ]


@dataclass(frozen=True, kw_only=True)
class DareLinear(_Dare):
    """DARE then task arithmetic: θ* = θ₀ + λ Σ_t w_t δ̂_t (÷ Σ w_t when ``normalize``)."""

    name = "dare_linear"
    contract = Contract(identity={"density": 1.0}, typical={"density": 0.4}, sums=True)
    reference = 'Yu et al. 2024, Language models are Super Mario (DARE, arXiv:2311.03099)'
    mergekit = MergekitSpec("dare_linear", gta_params(False, True), "required",
                            lambda s, pm, n: _from_mergekit("dare_linear", s, pm))
    normalize: bool = False

    def combine(self, inputs: TensorInputs) -> Tensor:
        x = self.dropped(inputs)
        return weighted_mean(x, inputs.weights) if self.normalize else weighted_sum(x, inputs.weights)


@dataclass(frozen=True, kw_only=True)
class DareTies(_Dare):
    """DARE then TIES-style sign election and fuse.

    ``zero_sign``: the elected sign where the weighted sum is 0: ``"positive"`` (mergekit) or
    ``"majority"`` (the sign of the sum of the elected signs)."""

    name = "dare_ties"
    contract = Contract(identity={"density": 1.0}, typical={"density": 0.4})
    reference = 'Yu et al. 2024, Language models are Super Mario (DARE, arXiv:2311.03099)'
    mergekit = MergekitSpec("dare_ties", gta_params(False, True), "required",
                            lambda s, pm, n: _from_mergekit("dare_ties", s, pm))
    allow_negative_weights = False
    normalize: bool = True
    extra_trim_density: float | None = None
    zero_sign: ZeroSign = "positive"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extra_trim_density is not None:
            check_range(self.name, "extra_trim_density", self.extra_trim_density, 0.0, 1.0, lo_open=True)
        check_choice(self.name, "zero_sign", self.zero_sign, ("positive", "majority"))

    def combine(self, inputs: TensorInputs) -> Tensor:
        fuse = {"normalize": self.normalize, "zero_sign": self.zero_sign, "consume": True}
        if self.extra_trim_density is not None:
            dropped = [d.mul_(topk_mask(d, self.extra_trim_density)) for d in self.dropped(inputs)]
            return elect_and_fuse(dropped, inputs.weights, **fuse)
        # the drop's masks in place now; its rescale block by block inside the fused loop
        finish = [dare_mask(d, inputs.per_expert(self.density, i), inputs.stream(i), self.rescale)
                  for i, d in enumerate(inputs.tensors)]
        return elect_and_fuse(inputs.tensors, inputs.weights, prepare=lambda t, b, a: finish[t](b, a), **fuse)


__all__ = ["DareLinear", "DareTies", "dare_drop", "dare_mask"]


def _from_mergekit(name, s, pm):
    kw = {"density": collapse(pm["density"]), "rescale": rescale_mode(s), "normalize": s["normalize"],
          "lambda_": s["lambda"]}
    if name == "dare_ties":
        kw.update(zero_sign="positive", extra_trim_density=None)
    return name, kw


explain(DareLinear, DareTies, math=__doc__)
