"""RegMean, RegMean++ and Fisher merging: the statistics and the closed-form merges (pure math).

RegMean (Jin et al., ICLR 2023, arXiv 2212.09849). For a linear layer y = W x (``nn.Linear``:
W is [out, in]; HF ``Conv1D`` stores Wᵀ, [in, out]) fine-tuned into W_i on task i, with X_i the
[n_i, in] matrix of that layer's inputs on task i's data, the merge that minimizes
Σ_i w_i ‖X_i Wᵀ − X_i W_iᵀ‖² is

    W*ᵀ = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,      G_i = X_iᵀ X_i / n_i   (``gram="mean"``, FusionBench)
                                                   G_i = X_iᵀ X_i         (``gram="sum"``: the paper's
                                                                           least squares over the
                                                                           concatenated tasks)
    G̃_i = α G_i + (1 − α) diag(G_i)              (α: FusionBench's ``reduce_non_diagonal_ratio``)

α = 1 is the exact closed form, α = 0 keeps only the diagonals (a per-input-feature weighted
average); identity Grams give the weighted average Σ w_i W_i / Σ w_i. The system is solved in
float64 (``torch.linalg.solve``; a singular Σ w_i G̃_i, e.g. an input feature that is always 0,
falls back to the pseudo-inverse, with a warning). Every other tensor (biases, norms,
embeddings, tensors without statistics) is the weighted average, as in the paper.

RegMean++ (Nguyen et al. 2025, arXiv 2508.03121) uses the same merge; only the statistics differ:
the inputs X_i of the layers of block l are taken on the *partly merged* model (blocks before l
already merged, block l and after expert i's), block by block (:mod:`.regmean_collect`).

Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832), per tensor and element:

    θ* = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε),     ε = ``floor`` (FusionBench's minimal_fisher_weight)
    c_i = w_i                                          (``normalize=False``)
    c_i = w_i · (1/(‖F_i‖ + ε)) / Σ_j (1/(‖F_j‖ + ε))   (``normalize=True``, FusionBench's default;
                                                        ‖F_i‖: the L2 norm over all of expert i's Fisher)

F_i is a diagonal Fisher of expert i on task i (:mod:`.regmean_collect`: ``"empirical"``, the
squared gradient of the labelled loss per batch, or ``"expected"``, FusionBench's estimator).

Statistics (:class:`MergeStatistics`) are stored as sums and counts, so shares of the batches
(DDP ranks) add up exactly; they are saved as one safetensors file whose header metadata holds the
JSON description (kind, experts, counts, layouts, settings).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError

log = logging.getLogger(__name__)

StatKind = Literal["regmean", "fisher"]
GramMode = Literal["mean", "sum"]
FORMAT = "lightning_merge.merge_statistics/1"

__all__ = ["FORMAT", "MergeStatistics", "fisher_average", "regmean_solve", "scale_off_diagonal",
           "weighted_average"]


def scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): the off-diagonal entries times α, the diagonal unchanged."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i θ_i / Σ w_i (float32)."""
    total = float(sum(weights))
    if total == 0:
        raise ConfigError(f"the expert weights {list(weights)} sum to 0; an average needs a non-zero total")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc.add_(t.double(), alpha=float(w))
    return acc.div_(total).float()


def regmean_solve(weights: Sequence[Tensor], grams: Sequence[Tensor], coeffs: Sequence[float], *,
                  alpha: float = 1.0, transpose: bool = True, name: str = "") -> Tensor:
    """W* of RegMean (module doc) from the experts' weights, their Grams [in, in] and weights c_i.

    ``transpose``: the weights are ``nn.Linear``'s [out, in] (True) or ``Conv1D``'s [in, out].
    """
    a: Tensor | None = None
    b: Tensor | None = None
    for w, g, c in zip(weights, grams, coeffs):
        gt = scale_off_diagonal(g.to(w.device, torch.float64), alpha) * float(c)
        wt = w.double().T if transpose else w.double()
        a = gt if a is None else a.add_(gt)
        b = gt @ wt if b is None else b.add_(gt @ wt)
    assert a is not None and b is not None
    try:
        x = torch.linalg.solve(a, b)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        log.warning("RegMean: Σ w_i G_i of '%s' is singular; using its pseudo-inverse", name)
        x = torch.linalg.pinv(a, hermitian=True) @ b
    return (x.T if transpose else x).contiguous().float()


def fisher_average(weights: Sequence[Tensor], fishers: Sequence[Tensor], coeffs: Sequence[float], *,
                   floor: float = 1e-6) -> Tensor:
    """θ* = Σ c_i (F_i + ε) θ_i / Σ c_i (F_i + ε), elementwise (float64 inside, float32 out)."""
    num = torch.zeros_like(weights[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for w, f, c in zip(weights, fishers, coeffs):
        fw = (f.to(w.device, torch.float64) + floor) * float(c)
        num.add_(fw * w.double())
        den.add_(fw)
    return num.div_(den).float()


@dataclass
class MergeStatistics:
    """Per-tensor, per-expert statistics of a RegMean or Fisher merge, as sums and counts.

    Attributes:
        kind: ``"regmean"`` (Gram sums Σ xxᵀ over the input rows of a linear layer, keyed by the
            layer's weight name) or ``"fisher"`` (sums of squared gradients, keyed by tensor name).
        experts: the experts' labels, in merge order.
        sums: tensor name -> {expert index -> float64 sum}.
        counts: tensor name -> {expert index -> rows (regmean) / batches or examples (fisher)}.
        transpose: (regmean) weight name -> True for ``nn.Linear`` ([out, in]), False for ``Conv1D``.
        settings: how they were collected (batches, estimator, plus_plus, expert_tasks, ...).
    """

    kind: StatKind
    experts: list[str]
    sums: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    counts: dict[str, dict[int, float]] = field(default_factory=dict)
    transpose: dict[str, bool] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("regmean", "fisher"):
            raise ConfigError(f"MergeStatistics: kind {self.kind!r} is not 'regmean' or 'fisher'")

    # ---- access
    def has(self, name: str, experts: Sequence[int]) -> bool:
        """Whether every expert in ``experts`` has statistics for ``name`` (with a non-zero count)."""
        got = self.sums.get(name)
        cnt = self.counts.get(name, {})
        return got is not None and all(e in got and cnt.get(e, 0) > 0 for e in experts)

    def mean(self, name: str, expert: int) -> Tensor:
        """The sum divided by its count: G_i of ``gram="mean"``, or F_i."""
        return self.sums[name][expert] / self.counts[name][expert]

    def gram(self, name: str, expert: int, mode: GramMode = "mean") -> Tensor:
        return self.mean(name, expert) if mode == "mean" else self.sums[name][expert]

    def fisher_norms(self, floor: float = 1e-6) -> list[float]:
        """‖F_i‖ over all of expert i's tensors (FusionBench's normalization), per expert."""
        sq = [0.0] * len(self.experts)
        for name, per in self.sums.items():
            for e in per:
                sq[e] += float(self.mean(name, e).double().pow(2).sum())
        return [math.sqrt(v) for v in sq]

    def add(self, name: str, expert: int, value: Tensor, count: float) -> None:
        """Accumulate a sum and its count (float64)."""
        per = self.sums.setdefault(name, {})
        if expert in per:
            per[expert].add_(value.double())
        else:
            per[expert] = value.detach().double().clone()
        c = self.counts.setdefault(name, {})
        c[expert] = c.get(expert, 0.0) + float(count)

    def check_experts(self, n_experts: int, who: str, where: str) -> None:
        if len(self.experts) != n_experts:
            raise ConfigError(f"{who}: the statistics in '{where}' are for {len(self.experts)} experts "
                              f"({self.experts}), the merge has {n_experts}; collect them for these experts")

    # ---- files
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: ``{kind}/{expert}/{name}`` float64 sums; the rest as JSON metadata."""
        from safetensors.torch import save_file

        from ..targets.atomic import atomic_file

        tensors = {f"{self.kind}/{e}/{name}": t.detach().cpu().contiguous()
                   for name, per in self.sums.items() for e, t in per.items()}
        meta = {"format": FORMAT, "kind": self.kind, "experts": self.experts,
                "counts": {n: {str(e): c for e, c in per.items()} for n, per in self.counts.items()},
                "transpose": self.transpose, "settings": self.settings}
        header = {"lightning_merge": json.dumps(meta)}
        return atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, *, kind: StatKind | None = None) -> MergeStatistics:
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        hint = ("write one with RegMeanMergeCallback(statistics_out=...) / FisherMergeCallback(statistics_out=...) "
                "or MergeStatistics.save")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("lightning_merge", "null"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise ValueError("no lightning_merge statistics metadata")
                stats = cls(kind=meta["kind"], experts=list(meta["experts"]), transpose=dict(meta["transpose"]),
                            settings=dict(meta["settings"]),
                            counts={n: {int(e): float(c) for e, c in per.items()} for n, per in meta["counts"].items()})
                for key in f.keys():
                    k, e, name = key.split("/", 2)
                    stats.sums.setdefault(name, {})[int(e)] = f.get_tensor(key)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise ConfigError(f"'{p}' is not a merge statistics file ({type(e).__name__}: {e}); {hint}") from None
        if kind is not None and stats.kind != kind:
            raise ConfigError(f"'{p}' holds {stats.kind} statistics, not {kind}; {hint}")
        return stats

    # ---- DDP
    def all_reduce(self, device: torch.device | None = None) -> MergeStatistics:
        """Sum every sum and count over the ranks of the default process group (in place).

        Every rank must hold the same names and experts (the collection creates them all up
        front, so a rank that saw no batch of a task holds zeros)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        dev = device or torch.device("cpu")
        keys = [(n, e) for n in sorted(self.sums) for e in sorted(self.sums[n])]
        for n, e in keys:
            t = self.sums[n][e].to(dev)
            dist.all_reduce(t)
            self.sums[n][e] = t.cpu()
        ckeys = [(n, e) for n in sorted(self.counts) for e in sorted(self.counts[n])]
        c = torch.tensor([self.counts[n][e] for n, e in ckeys], dtype=torch.float64, device=dev)
        dist.all_reduce(c)
        for (n, e), v in zip(ckeys, c.tolist()):
            self.counts[n][e] = v
        return self
