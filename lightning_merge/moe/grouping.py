"""Grouping the experts of a block around dominant experts (M-SMoE step 2).

Following the authors' ``group_experts_globally_from_dominant_experts`` (Mixtral) with a fixed
number G of groups per block: the experts are sorted by activation frequency, most used first
(ties: lower index first); the first G are the *dominant* experts, one per group; every other
expert, in that order, joins the group of the dominant expert it is most similar to (ties: the
more used dominant). Group g is numbered by the position of its dominant expert in index order,
so G = E keeps every expert in place. Similarities (E × E, larger = more alike):

* ``"router-logits"`` (the authors' default): (cos + 1) / 2 between router-logit columns over the
  calibration tokens (:meth:`~lightning_merge.moe.stats.RoutingStatistics.similarity`);
* ``"router-weight"``: (cos + 1) / 2 between router rows;
* ``"weight"``: (cos + 1) / 2 between the experts' flattened gate, up and down weights.

The authors also offer a *global* allocation (a different G per layer with the average fixed);
HF configs hold one expert count for every block, so the count here is the same in every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .arch import Expert

__all__ = ["Groups", "group_experts", "weight_similarity", "row_similarity"]


@dataclass
class Groups:
    """``dominant[g]``: the dominant expert of group g; ``labels[e]``: the group of expert e."""

    dominant: list[int]
    labels: list[int]

    def members(self, g: int) -> list[int]:
        """The experts of group g, dominant first, then by index."""
        d = self.dominant[g]
        return [d] + [e for e, lab in enumerate(self.labels) if lab == g and e != d]


def _cos_sim(v: Tensor) -> Tensor:
    v = v.double()
    n = v.norm(dim=1).clamp_min(1e-300)
    s = (v @ v.T / (n[:, None] * n[None, :]) + 1) / 2
    s.fill_diagonal_(1.0)
    return s


def row_similarity(router_weight: Tensor) -> Tensor:
    return _cos_sim(router_weight.detach())


def weight_similarity(experts: list[Expert]) -> Tensor:
    return _cos_sim(torch.stack([torch.cat([e.gate.flatten(), e.up.flatten(), e.down.flatten()]) for e in experts]))


def group_experts(frequency: Tensor, similarity: Tensor, num_groups: int) -> Groups:
    """Dominant experts and group labels (module doc)."""
    e = frequency.shape[0]
    order = torch.argsort(frequency.double(), descending=True, stable=True).tolist()
    dom_by_use = order[:num_groups]
    dominant = sorted(dom_by_use)
    labels = [-1] * e
    for g, d in enumerate(dominant):
        labels[d] = g
    for x in order[num_groups:]:
        scores = similarity[x, dom_by_use]
        best = dom_by_use[int(torch.argmax(scores))]  # first maximum: the more used dominant
        labels[x] = dominant.index(best)
    return Groups(dominant, labels)
