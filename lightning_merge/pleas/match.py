"""Step 1 of PLeaS: match the two models' units, then choose which matched pairs to merge.

**Matching** (the authors' activation matching). For a group with U units of s features each,
over its match sites (module :mod:`.spec`), the cost of pairing unit i of A with unit j of B is

    D_ij = Σ_sites Σ_t E[(a_(i,t) − b_(j,t))²]         (``metric="distance"``, the default)

(the authors sum −cdist of the features over batches; the squared distance is the form whose sums
add up exactly across batches and ranks), or minus the mean Pearson correlation of the paired
features (``metric="correlation"``, ZipIt!'s). ``scipy.optimize.linear_sum_assignment`` gives
the permutation π minimising Σ_i D_(i,π(i)). Heads: a unit is a key/value head with its query
heads, compared feature by feature at the same position inside the head (heads stay whole; the
order of features inside a head is not changed, which keeps rotary embeddings valid).

**Partial merging** (``width`` ρ ∈ [1, 2]: merged width / one model's width). A partial group
keeps m = U − s pairs merged and the s = round((ρ − 1)·U) worst-matched pairs separate (both
units kept): width U + s, from U (ρ = 1, full merge) to 2U (ρ = 2, no merging). Pairs are ranked
by the normalised cost d̂ = D_ij / Σ E[a²] + E[b²] (0: identical, 1: uncorrelated; correlation
metric: d̂ = 1 − ρ̄), so groups of different scales compare. ``budget="uniform"`` uses ρ in every
partial group (a dict gives a ρ per group); ``budget="matching"`` keeps the same total number of
separate units but spends it on the globally worst-matched pairs, so layers whose units match
badly get wider (the paper's per-layer budgets come from a QP over FLOPs with offline
per-layer sensitivities that the authors' repository does not ship). Groups that are not partial
(the residual stream, attention heads) are always fully merged.

The merged axis is laid out as the authors do: [merged pairs (in A's order), A's separate
units, B's separate units (their partners' order)]. Each axis is described by two matrices
S_A, S_B [width × n]: the combined features are z̃ = S_A a + S_B b (½ on both sides of a merged
pair, 1 for a separate unit); shared axes use S_A = S_B = ½I, separate output heads [I; 0], [0; I].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .collect import FeatureStats
from .spec import PLeaSSpec

log = logging.getLogger(__name__)

Metric = Literal["distance", "correlation"]
Budget = Literal["uniform", "matching"]

__all__ = ["AxisPlan", "GroupMatch", "UnitPlan", "axis_plans", "match_groups", "plan_units", "width_ratio"]


@dataclass
class GroupMatch:
    perm: Tensor  # perm[i]: the unit of B matched to unit i of A
    cost: Tensor  # d̂ of each matched pair (lower: more alike)


@dataclass
class UnitPlan:
    merged_a: Tensor
    merged_b: Tensor
    sep_a: Tensor
    sep_b: Tensor

    @property
    def width(self) -> int:
        return len(self.merged_a) + len(self.sep_a) + len(self.sep_b)


@dataclass
class AxisPlan:
    sa: Tensor  # [width, n] float64
    sb: Tensor

    @property
    def width(self) -> int:
        return int(self.sa.shape[0])


def _unit_costs(stats: FeatureStats, site: str, units: int, s: int, metric: Metric) -> tuple[Tensor, Tensor]:
    k = stats.moment(site)
    n = (k.shape[0] - 1) // 2
    if n != units * s:
        raise ConfigError(f"pleas: site '{site}' has {n} features, expected {units} units × {s}")
    eab = k[:n, n:2 * n].reshape(units, s, units, s)
    ea2, eb2 = k[:n, :n].diagonal().reshape(units, s), k[n:2 * n, n:2 * n].diagonal().reshape(units, s)
    cross = torch.einsum("itjt->ij", eab)
    if metric == "distance":
        norm = ea2.sum(1)[:, None] + eb2.sum(1)[None, :]
        return norm - 2 * cross, norm
    mua, mub = k[:n, -1].reshape(units, s), k[n:2 * n, -1].reshape(units, s)
    sda = (ea2 - mua ** 2).clamp_min(1e-12).sqrt()
    sdb = (eb2 - mub ** 2).clamp_min(1e-12).sqrt()
    cov = eab - mua[:, :, None, None] * mub[None, None, :, :]
    corr = cov / (sda[:, :, None, None] * sdb[None, None, :, :])
    mean_corr = torch.einsum("itjt->ij", corr) / s
    return -mean_corr, torch.ones_like(mean_corr)


def match_groups(spec: PLeaSSpec, stats: FeatureStats, metric: Metric = "distance",
                 identity: bool = False) -> dict[str, GroupMatch]:
    """The permutation of every group (``identity``: no matching, for the weight-average baseline)."""
    from scipy.optimize import linear_sum_assignment

    if metric not in ("distance", "correlation"):
        raise ConfigError(f"pleas: metric {metric!r} is not 'distance' or 'correlation'")
    out: dict[str, GroupMatch] = {}
    for name, g in spec.groups.items():
        cost = torch.zeros(g.units, g.units, dtype=torch.float64)
        norm = torch.zeros_like(cost)
        for site, s in g.match:
            c, z = _unit_costs(stats, site, g.units, s, metric)
            cost += c
            norm += z
        if identity:
            perm = torch.arange(g.units)
        else:
            rows, cols = linear_sum_assignment(cost.numpy())
            perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
        idx = torch.arange(g.units)
        c, z = cost[idx, perm], norm[idx, perm]
        dhat = c / z.clamp_min(1e-300) if metric == "distance" else 1 + c / len(g.match)
        out[name] = GroupMatch(perm, dhat)
    return out


def width_ratio(width: float | Mapping[str, float], group: str) -> float:
    rho = width.get(group, 1.0) if isinstance(width, Mapping) else width
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 1.0 <= float(rho) <= 2.0:
        raise ConfigError(f"pleas: width {rho!r} (group '{group}') is out of range; it is the merged width over one "
                          "model's width, from 1.0 (every unit merged) to 2.0 (no merging)")
    return float(rho)


def plan_units(spec: PLeaSSpec, matches: Mapping[str, GroupMatch], width: float | Mapping[str, float],
               budget: Budget = "uniform") -> dict[str, UnitPlan]:
    """Which matched pairs are merged and which kept separate, per group (module doc)."""
    if budget not in ("uniform", "matching"):
        raise ConfigError(f"pleas: budget {budget!r} is not 'uniform' or 'matching'")
    if isinstance(width, Mapping):
        unknown = sorted(set(width) - set(spec.groups))
        if unknown:
            raise ConfigError(f"pleas: width names unknown groups {unknown}; the partial groups are "
                              f"{[g for g, v in spec.groups.items() if v.partial]}")
        if spec.uniform_partial and len({width_ratio(width, g) for g, v in spec.groups.items() if v.partial}) > 1:
            raise ConfigError(f"pleas: a {spec.family} model has one MLP width in its config; give one width for "
                              "every layer")
    if budget == "matching" and spec.uniform_partial:
        raise ConfigError(f"pleas: budget='matching' gives layers different widths, which a {spec.family} config "
                          "cannot hold (one intermediate_size); use budget='uniform'")
    n_sep: dict[str, int] = {}
    for name, g in spec.groups.items():
        rho = width_ratio(width, name)
        n_sep[name] = round((rho - 1.0) * g.units) if g.partial else 0
        if not g.partial and rho != 1.0 and isinstance(width, Mapping) and name in width:
            raise ConfigError(f"pleas: group '{name}' is always fully merged (width 1.0), got {rho}")
    if budget == "matching":
        total = sum(n_sep.values())
        pool = [(float(matches[g].cost[i]), g, i) for g, v in spec.groups.items() if v.partial
                for i in range(v.units)]
        pool.sort(key=lambda t: -t[0])
        chosen: dict[str, list[int]] = {g: [] for g in spec.groups}
        for _, g, i in pool[:total]:
            chosen[g].append(i)
    plans: dict[str, UnitPlan] = {}
    for name, g in spec.groups.items():
        m = matches[name]
        if budget == "matching":
            sep_idx = torch.tensor(sorted(chosen[name]), dtype=torch.long)
        else:
            order = torch.argsort(m.cost, descending=True, stable=True)
            sep_idx = order[:n_sep[name]].sort().values
        keep = torch.ones(g.units, dtype=torch.bool)
        keep[sep_idx] = False
        idx = torch.arange(g.units)
        plans[name] = UnitPlan(idx[keep], m.perm[keep], idx[~keep], m.perm[~keep])
    return plans


def axis_plans(spec: PLeaSSpec, plans: Mapping[str, UnitPlan]) -> dict[str, AxisPlan]:
    """S_A, S_B of every axis (module doc)."""
    out: dict[str, AxisPlan] = {}
    for name, ax in spec.axes.items():
        n = ax.size
        eye = torch.eye(n, dtype=torch.float64)
        if ax.kind == "shared":
            out[name] = AxisPlan(eye / 2, eye / 2)
            continue
        if ax.kind == "separate":
            z = torch.zeros(n, n, dtype=torch.float64)
            out[name] = AxisPlan(torch.cat([eye, z]), torch.cat([z, eye]))
            continue
        p, s = plans[ax.group], ax.unit  # type: ignore[index]
        sa = torch.zeros(p.width * s, n, dtype=torch.float64)
        sb = torch.zeros_like(sa)
        t = torch.arange(s)
        row = 0
        for ua, ub in zip(p.merged_a.tolist(), p.merged_b.tolist()):
            sa[row + t, ua * s + t] = 0.5
            sb[row + t, ub * s + t] = 0.5
            row += s
        for ua in p.sep_a.tolist():
            sa[row + t, ua * s + t] = 1.0
            row += s
        for ub in p.sep_b.tolist():
            sb[row + t, ub * s + t] = 1.0
            row += s
        out[name] = AxisPlan(sa, sb)
    return out
