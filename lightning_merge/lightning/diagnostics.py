"""Merge diagnostics: tensor groups (numbered blocks), sign-conflict rates, per-group method statistics."""

from __future__ import annotations

import math
from collections import defaultdict

from ..engine import MergePlan
from ..methods.adaptive_rms import AdaptiveRMS
from ..methods.base import TensorInputs
from ..methods.dppa import DPPA
from ..naming import layer_of

#: entries per tensor (evenly strided) sampled for the sign-conflict rate
CONFLICT_SAMPLES = 1 << 16


def group_of(name: str) -> str:
    """The diagnostics group of a tensor: its numbered block (``model.layers.3``) or its module
    (``model.embed_tokens``, ``lm_head``)."""
    parts = layer_of(name)
    if parts is not None:
        return f"{parts[0]}.{parts[1]}"
    return name.rsplit(".", 1)[0] if "." in name else name


def sign_conflict(inputs: TensorInputs, space: str) -> tuple[int, int] | None:
    """(entries where two experts' deltas have opposite signs, entries sampled), on at most
    :data:`CONFLICT_SAMPLES` evenly strided entries; None with fewer than two experts."""
    if len(inputs.tensors) < 2 or (space == "weight" and inputs.base is None):
        return None
    n = inputs.tensors[0].numel()
    step = max(1, -(-n // CONFLICT_SAMPLES))
    pos = neg = None
    for t in inputs.tensors:
        s = t.reshape(-1)[::step]
        if space == "weight":
            s = s - inputs.base.reshape(-1)[::step]
        pos = s > 0 if pos is None else pos | (s > 0)
        neg = s < 0 if neg is None else neg | (s < 0)
    return int((pos & neg).sum()), int(pos.numel())


def method_group_means(plan: MergePlan) -> dict[str, dict[str, float]]:
    """Per-group means of adaptive-RMS drop rates / DPPA densities (after the statistics passes)."""
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    if isinstance(plan.method, AdaptiveRMS) and plan.stats is not None:
        for name, rates in AdaptiveRMS.drop_rates(plan.stats).items():
            vals[group_of(name)]["drop_rate"].extend(p for p in rates if not math.isnan(p))
    elif isinstance(plan.method, DPPA) and plan.stats is not None:
        for name, per in DPPA.matrix_densities(plan.stats).items():
            for top, band in per.values():
                vals[group_of(name)]["density_top"].append(top)
                vals[group_of(name)]["density_band"].append(band)
    return {g: {k: math.fsum(v) / len(v) for k, v in d.items() if v} for g, d in vals.items()}
