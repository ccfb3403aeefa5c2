"""MC-SMoE: compress each (merged) expert into a low-rank plus a structured-sparse part.

Every expert matrix W [m, n] (gate [I, H], up [I, H], down [H, I] of every expert of every block)
becomes W ≈ L R + S, as the authors' LoSparse step (``low_rank_decomposition``,
``_substitute_single_linear_weight``, ``LoSparsePruner``):

* L R: the rank-r truncated SVD, L = U_r Σ_r^½ [m, r], R = Σ_r^½ V_rᵀ [r, n] (the largest singular
  values; ``remove_criteria="max_eigenvalue"``);
* S: the residual W − L R with whole rows zeroed (``structured_direction="row"``): each row's
  importance is the mean of |S_ij| over the row (``structured_method="mean"`` with their
  ``"Magnitude"`` importance), and the ⌊(1 − sparsity) · m⌋ most important rows are kept.

Error: with D the dropped rows of the residual, ‖W − (L R + S)‖_F² = Σ_{i∈D} ‖(W − L R)_i‖² ≤
‖W − L R‖_F² = Σ_{j>r} σ_j², so the relative error ‖W − Ŵ‖_F / ‖W‖_F is at most the SVD tail
sqrt(Σ_{j>r} σ_j²) / ‖W‖_F (reported as ``bound``): 0 when sparsity = 0, the tail itself when
sparsity = 1. Stored parameters: r (m + n) + k n (k kept rows, plus k row indices).

What differs from the authors: they then fine-tune L, R and S with knowledge distillation while
PLATON (|θ · ∇θ| smoothed over steps) prunes S on a cubic schedule, with one global threshold over
all matrices. Here the compression is one-shot and training-free: magnitude importance, the
sparsity reached per matrix. Fine-tuning afterwards is the Lightning run's ``fit``.

Storage: the model's expert weights are replaced by the dense reconstruction L R + S (so the
Hugging Face folder loads with ``from_pretrained`` as a plain MoE), and the factored form is written
beside it as ``mcsmoe_factors.safetensors`` (``<block>.<expert>.<matrix>.{left,right,rows,sparse}``;
:func:`load_factors` reads it back).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .arch import Expert, moe_layers, read_experts, write_experts

log = logging.getLogger(__name__)

__all__ = ["FACTORS", "Factor", "MoECompression", "load_factors", "low_rank_sparse", "mcsmoe", "mcsmoe_compress"]

FACTORS = "mcsmoe_factors.safetensors"


@dataclass
class Factor:
    """W ≈ left @ right + S, S = 0 except rows ``rows`` which hold ``sparse``."""

    left: Tensor
    right: Tensor
    rows: Tensor
    sparse: Tensor
    shape: tuple[int, int]
    error: float = 0.0
    bound: float = 0.0

    def dense(self) -> Tensor:
        w = self.left.double() @ self.right.double()
        w[self.rows] += self.sparse.double()
        return w.float()

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def sparsity(self) -> float:
        """Fraction of the rows of S that are zero."""
        return 1.0 - self.rows.numel() / self.shape[0]

    @property
    def params(self) -> int:
        m, n = self.shape
        return self.rank * (m + n) + self.rows.numel() * n


def low_rank_sparse(w: Tensor, rank: int, sparsity: float) -> Factor:
    """The factorisation of the module doc for one matrix (float64 SVD)."""
    m, n = w.shape
    x = w.double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
    resid = x - left @ right
    keep = int(math.floor((1.0 - sparsity) * m + 1e-9))
    score = resid.abs().mean(dim=1)
    rows = torch.sort(torch.argsort(score, descending=True, stable=True)[:keep]).values
    f = Factor(left.float(), right.float(), rows, resid[rows].float(), (m, n))
    norm = float(x.norm()) or 1.0
    f.error = float((x - f.dense().double()).norm()) / norm
    f.bound = float(s[rank:].pow(2).sum().sqrt()) / norm
    return f


@dataclass
class MoECompression:
    """The compressed model (changed in place), every factor ``{(block, expert, matrix): Factor}`` and
    the summary (:meth:`report`)."""

    model: nn.Module
    factors: dict[tuple[str, int, str], Factor]
    settings: dict[str, Any]
    path: Path | None = None

    def report(self) -> dict[str, Any]:
        dense = sum(f.shape[0] * f.shape[1] for f in self.factors.values())
        stored = sum(f.params for f in self.factors.values())
        errors = [f.error for f in self.factors.values()]
        return {"settings": self.settings, "expert_params_dense": dense, "expert_params_factored": stored,
                "ratio": stored / dense if dense else 1.0, "max_relative_error": max(errors, default=0.0),
                "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
                "matrices": [{"block": b, "expert": e, "matrix": k, "rank": f.rank, "rows_kept": f.rows.numel(),
                              "sparsity": f.sparsity, "relative_error": f.error, "bound": f.bound}
                             for (b, e, k), f in self.factors.items()]}

    def save_factors(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from ..targets.atomic import atomic_file

        tensors: dict[str, Tensor] = {}
        for (b, e, k), f in self.factors.items():
            for part in ("left", "right", "rows", "sparse"):
                tensors[f"{b}.{e}.{k}.{part}"] = getattr(f, part).contiguous()
        return atomic_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "mcsmoe/1"}))


def load_factors(path: str | Path) -> dict[tuple[str, int, str], Factor]:
    """The factors written by :meth:`MoECompression.save_factors` (errors not stored: 0)."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out: dict[tuple[str, int, str], Factor] = {}
    for key in {k.rsplit(".", 1)[0] for k in raw}:
        b, e, k = key.rsplit(".", 2)
        left, right = raw[f"{key}.left"], raw[f"{key}.right"]
        out[(b, int(e), k)] = Factor(left, right, raw[f"{key}.rows"], raw[f"{key}.sparse"],
                                     (left.shape[0], right.shape[1]))
    return out


def _check(rank: Any, sparsity: Any, limit: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ConfigError(f"rank={rank!r} is out of range: the expert matrices allow an integer rank between 1 and "
                          f"{limit} (min of intermediate and hidden size)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ConfigError(f"sparsity={sparsity!r} is out of range: pass the fraction of the sparse part's rows to "
                          "zero, between 0 and 1 (the authors keep 10%: sparsity=0.9)")


def mcsmoe_compress(model: nn.Module, *, rank: int, sparsity: float, out_dir: str | Path | None = None,
                    overwrite: bool = False, merge_report: dict[str, Any] | None = None) -> MoECompression:
    """Compress every expert of every block of ``model`` in place (module doc).

    ``rank``: r of the low-rank part; ``sparsity``: the fraction of the sparse part's rows set to
    zero. ``out_dir``: also write the model (dense reconstruction), ``mcsmoe_factors.safetensors`` and
    ``moe_merge.json`` (``merge_report`` plus this compression's report) atomically."""
    from .merge import _check_out

    layers = moe_layers(model)
    _check(rank, sparsity, min(layers[0].intermediate, int(layers[0].router.weight.shape[1])))
    _check_out(out_dir, overwrite)
    factors: dict[tuple[str, int, str], Factor] = {}
    for layer in layers:
        new = []
        for e, expert in enumerate(read_experts(layer)):
            parts = {}
            for k, w in expert.matrices().items():
                f = low_rank_sparse(w, rank, float(sparsity))
                factors[(layer.name, e, k)] = f
                parts[k] = f.dense()
            new.append(Expert(**parts))
        write_experts(layer, new)
    result = MoECompression(model, factors, {"method": "mcsmoe", "rank": rank, "sparsity": float(sparsity)})
    rep = result.report()
    log.info("MC-SMoE: expert parameters %d -> %d factored (%.1f%%), max relative error %.4f",
             rep["expert_params_dense"], rep["expert_params_factored"], 100 * rep["ratio"], rep["max_relative_error"])
    if out_dir is not None:
        from .merge import save_moe

        report = {**(merge_report or {}), "compression": {k: v for k, v in rep.items() if k != "matrices"}}
        result.path = save_moe(model, out_dir, overwrite=overwrite, report=report,
                               extra={FACTORS: result.save_factors})
    return result


def mcsmoe(model: nn.Module, dataloader: Any = None, *, num_experts: int, rank: int, sparsity: float,
           out_dir: str | Path | None = None, overwrite: bool = False,
           **merge_kwargs: Any) -> tuple[Any, MoECompression]:
    """M-SMoE (:func:`~lightning_merge.moe.msmoe_merge`, ``merge_kwargs``) then :func:`mcsmoe_compress`;
    ``out_dir`` receives the final model once. Returns (merge result, compression result)."""
    from .merge import _check_out, msmoe_merge

    layers = moe_layers(model)
    _check(rank, sparsity, min(layers[0].intermediate, int(layers[0].router.weight.shape[1])))
    _check_out(out_dir, overwrite)
    merged = msmoe_merge(model, dataloader, num_experts=num_experts, **merge_kwargs)
    comp = mcsmoe_compress(model, rank=rank, sparsity=sparsity, out_dir=out_dir, overwrite=overwrite,
                           merge_report=merged.report())
    return merged, comp
