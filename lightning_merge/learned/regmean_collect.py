"""Collecting RegMean Grams and diagonal Fishers on each expert's task data.

Each expert m runs as the target (θ_m = θ₀ + δ_m from an :class:`~lightning_merge.learned.ExpertBank`,
through ``call(params, inputs)``, e.g. ``torch.func.functional_call``) on batches of its own task.

* Grams (:func:`collect_grams`): forward hooks on the inputs x of every ``nn.Linear`` and HF
  ``Conv1D`` whose weight is a bank tensor (tied weights excluded) add Σ xxᵀ (float64) and the
  number of rows; with ``ignore_padding`` rows where ``attention_mask`` is 0 are left out (the
  rows of an input whose leading shape is the mask's). ``plus_plus=True`` is RegMean++: the
  parameter groups (numbered blocks ``model.layers.3``, or modules such as ``model.embed_tokens``,
  :func:`~lightning_merge.lightning.group_of`) are taken in the order the forward pass first uses
  them; for group g the model runs with every earlier group already merged and g and later ones
  expert m's, the forward stopping after g's last linear layer; g is then merged (RegMean for its
  linear weights, the weighted average for the rest) before the next group.
* Fishers (:func:`collect_fishers`): per batch one backward pass of expert m; ``"empirical"``
  adds g² with g = ∇_θ L (L: the model's labelled loss, :func:`~lightning_merge.learned.task_loss`),
  count 1 per batch, so F = mean over batches of g² (the per-example empirical Fisher with batch
  size 1); ``"expected"`` is FusionBench's estimator: g = ∇_θ Σ_x Σ_y sqrt(p_y(x))·log p_y(x)
  (p detached, summed over the batch's predictions), count = the batch's examples.

Batches: the first ``max_batches`` of each task. Under DDP rank r of w takes batches r, r + w, ...
of them, and the sums and counts are all-reduced (:meth:`MergeStatistics.all_reduce`; for
RegMean++ once per group), so the statistics equal one process's over the same batches (up to
float64 summation order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..lightning.diagnostics import group_of
from ..methods.base import TensorInputs
from .bank import ExpertBank
from .objectives import logits_of, task_loss
from .regmean import MergeStatistics

log = logging.getLogger(__name__)

Call = Callable[[dict[str, Tensor], Mapping[str, Any]], Any]

__all__ = ["collect_fishers", "collect_grams", "linear_layers"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (RegMean++)."""


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _my_batches(loader: Iterable[Mapping[str, Any]], max_batches: int) -> list[Mapping[str, Any]]:
    rank, world = _rank_world()
    out = []
    for k, batch in enumerate(loader):
        if k >= max_batches:
            break
        if k % world == rank:
            out.append(batch)
    return out


def linear_layers(target: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, nn.Module, bool]]:
    """weight name -> (module name, module, transpose) for the ``nn.Linear`` / HF ``Conv1D`` layers
    whose weight is one of ``names`` and not shared with another module (tied embeddings)."""
    wanted = set(names)
    owners: dict[int, int] = {}
    for _, p in target.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, tuple[str, nn.Module, bool]] = {}
    for mname, mod in target.named_modules():
        is_linear = isinstance(mod, nn.Linear)
        is_conv1d = type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None
        if not (is_linear or is_conv1d):
            continue
        wname = f"{mname}.weight" if mname else "weight"
        w = mod.weight
        if wname in wanted and w.ndim == 2 and owners.get(id(w), 0) == 1:
            out[wname] = (mname, mod, is_linear)
    return out


class _GramHooks:
    """Forward hooks adding Σ xxᵀ of a set of layers' inputs to ``stats`` for expert ``m``."""

    def __init__(self, layers: Mapping[str, tuple[str, nn.Module, bool]], stats: MergeStatistics,
                 ignore_padding: bool, stop_after: str | None = None) -> None:
        self.stats, self.ignore_padding, self.stop_after = stats, ignore_padding, stop_after
        self.expert = 0
        self.mask: Tensor | None = None
        self.handles = [mod.register_forward_hook(self._hook(wname)) for wname, (_, mod, _) in layers.items()]

    def _hook(self, wname: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()
            if self.ignore_padding and self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).double()
            self.stats.add(wname, self.expert, (x.T @ x).cpu(), x.shape[0])
            if wname == self.stop_after:
                raise _Stop

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _mask_of(batch: Mapping[str, Any]) -> Tensor | None:
    m = batch.get("attention_mask")
    return m.bool() if isinstance(m, Tensor) else None


def _inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _empty(kind: str, bank: ExpertBank, layers: Mapping[str, tuple[str, nn.Module, bool]] | None,
           settings: dict[str, Any]) -> MergeStatistics:
    """Zero sums for every (tensor, expert), so every rank holds the same keys."""
    stats = MergeStatistics(kind=kind, experts=list(bank.labels), settings=settings)  # type: ignore[arg-type]
    n = bank.n_experts
    if layers is not None:
        for wname, (_, mod, is_linear) in layers.items():
            d = mod.weight.shape[1] if is_linear else mod.weight.shape[0]
            stats.sums[wname] = {m: torch.zeros(d, d, dtype=torch.float64) for m in range(n)}
            stats.counts[wname] = {m: 0.0 for m in range(n)}
            stats.transpose[wname] = is_linear
    else:
        for name in bank.names:
            shape = bank.base(name).shape
            stats.sums[name] = {m: torch.zeros(shape, dtype=torch.float64) for m in range(n)}
            stats.counts[name] = {m: 0.0 for m in range(n)}
    return stats


def _check(bank: ExpertBank, data: Mapping[str, Any], expert_tasks: Sequence[str], who: str) -> None:
    if len(expert_tasks) != bank.n_experts:
        raise ConfigError(f"{who}: expert_tasks {list(expert_tasks)} must name one task per expert ({bank.n_experts})")
    missing = [t for t in expert_tasks if t not in data]
    if missing:
        raise ConfigError(f"{who}: expert_tasks {missing} have no data (tasks: {list(data)})")


def collect_grams(bank: ExpertBank, call: Call, data: Mapping[str, Iterable[Mapping[str, Any]]],
                  expert_tasks: Sequence[str], *, max_batches: int = 8, ignore_padding: bool = True,
                  plus_plus: bool = False, weights: Sequence[float] | None = None, alpha: float = 1.0,
                  gram: str = "mean", device: torch.device | None = None) -> MergeStatistics:
    """RegMean (or RegMean++) Gram statistics of every linear layer of ``bank.target`` (module doc).

    ``weights``, ``alpha`` and ``gram`` are the merge's, used by RegMean++ to merge each group
    before the next; ``device``: where NCCL all-reduces (None: CPU, gloo)."""
    who = "RegMean++" if plus_plus else "RegMean"
    _check(bank, data, expert_tasks, who)
    layers = linear_layers(bank.target, bank.names)
    if not layers:
        raise ConfigError(f"{who}: the target has no nn.Linear / Conv1D layer among its merged tensors")
    settings = {"max_batches": max_batches, "ignore_padding": ignore_padding, "plus_plus": plus_plus,
                "expert_tasks": list(expert_tasks)}
    if plus_plus:
        settings.update(alpha=alpha, gram=gram, weights=list(weights or [1.0] * bank.n_experts))
    stats = _empty("regmean", bank, layers, settings)
    batches = {t: _my_batches(data[t], max_batches) for t in dict.fromkeys(expert_tasks)}
    if not plus_plus:
        hooks = _GramHooks(layers, stats, ignore_padding)
        try:
            with torch.no_grad():
                for m, task in enumerate(expert_tasks):
                    hooks.expert = m
                    params = bank.expert_params(m)
                    for batch in batches[task]:
                        hooks.mask = _mask_of(batch)
                        call(params, _inputs(batch))
                    del params
        finally:
            hooks.close()
        return stats.all_reduce(device)
    return _plus_plus(bank, call, batches, expert_tasks, layers, stats, ignore_padding,
                      list(weights or [1.0] * bank.n_experts), alpha, gram, device)


def _group_order(bank: ExpertBank, call: Call, batch: Mapping[str, Any]) -> list[str]:
    """Parameter groups in the order a forward pass first uses them (then the unused ones)."""
    seen: list[str] = []
    handles = []
    for mname, mod in bank.target.named_modules():
        own = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)]
        own = [n for n in own if n in set(bank.names)]
        if not own:
            continue

        def pre(module: nn.Module, args: Any, own: list[str] = own) -> None:
            for n in own:
                g = group_of(n)
                if g not in seen:
                    seen.append(g)

        handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            call(bank.expert_params(0), _inputs(batch))
    finally:
        for h in handles:
            h.remove()
    rest = [g for g in dict.fromkeys(group_of(n) for n in bank.names) if g not in seen]
    return seen + rest


def _plus_plus(bank: ExpertBank, call: Call, batches: Mapping[str, list[Mapping[str, Any]]],
               expert_tasks: Sequence[str], layers: Mapping[str, tuple[str, nn.Module, bool]],
               stats: MergeStatistics, ignore_padding: bool, weights: list[float], alpha: float, gram: str,
               device: torch.device | None) -> MergeStatistics:
    from .regmean_methods import RegMean

    probe = next((b[0] for b in batches.values() if b), None)
    order = _group_order(bank, call, probe) if probe is not None else []
    if probe is None:  # this rank has no batch: the order must still match the other ranks'
        order = list(dict.fromkeys(group_of(n) for n in bank.names))
    order = _agree(order)
    by_group: dict[str, list[str]] = {}
    for n in bank.names:
        by_group.setdefault(group_of(n), []).append(n)
    merged: dict[str, Tensor] = {}
    method = RegMean(alpha=alpha, gram=gram)  # type: ignore[arg-type]
    n = bank.n_experts
    execution: list[str] = []  # linear weights in the order the probe ran them
    if probe is not None:
        rec = _Recorder(layers)
        try:
            with torch.no_grad():
                call(bank.expert_params(0), _inputs(probe))
        finally:
            rec.close()
        execution = rec.order
    for g in order:
        group_layers = {w: layers[w] for w in by_group.get(g, []) if w in layers}
        if group_layers:
            ran = [w for w in execution if w in group_layers]
            hooks = _GramHooks(group_layers, stats, ignore_padding, stop_after=ran[-1] if ran else None)
            try:
                with torch.no_grad():
                    for m, task in enumerate(expert_tasks):
                        hooks.expert = m
                        params = {k: merged.get(k) if k in merged else bank.expert_tensor(m, k) for k in bank.names}
                        for batch in batches[task]:
                            hooks.mask = _mask_of(batch)
                            try:
                                call(params, _inputs(batch))
                            except _Stop:
                                pass
                        del params
            finally:
                hooks.close()
            part = MergeStatistics(kind="regmean", experts=stats.experts,
                                   sums={w: stats.sums[w] for w in group_layers},
                                   counts={w: stats.counts[w] for w in group_layers})
            part.all_reduce(device)
            for w in group_layers:
                stats.sums[w], stats.counts[w] = part.sums[w], part.counts[w]
        staged = method.with_statistics(stats)
        for name in by_group.get(g, []):
            tensors = [bank.expert_tensor(m, name) for m in range(n)]
            merged[name] = staged.merge(TensorInputs(name, None, tensors, list(range(n)), list(weights)))
    return stats


class _Recorder:
    """Records the order in which the given layers run."""

    def __init__(self, layers: Mapping[str, tuple[str, nn.Module, bool]]) -> None:
        self.order: list[str] = []
        self.handles = [mod.register_forward_hook(lambda *_, w=w: self.order.append(w) if w not in self.order else None)
                        for w, (_, mod, _) in layers.items()]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _agree(order: list[str]) -> list[str]:
    """Rank 0's group order on every rank (the probe batches differ between ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return order
    box = [order]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collect_fishers(bank: ExpertBank, call: Call, data: Mapping[str, Iterable[Mapping[str, Any]]],
                    expert_tasks: Sequence[str], *, max_batches: int = 8, estimator: str = "empirical",
                    device: torch.device | None = None) -> MergeStatistics:
    """Diagonal Fisher statistics of every floating tensor of ``bank.target`` (module doc)."""
    _check(bank, data, expert_tasks, "Fisher merging")
    if estimator not in ("empirical", "expected"):
        raise ConfigError(f"Fisher merging: estimator {estimator!r} is not 'empirical' or 'expected'")
    stats = _empty("fisher", bank, None, {"max_batches": max_batches, "estimator": estimator,
                                          "expert_tasks": list(expert_tasks)})
    batches = {t: _my_batches(data[t], max_batches) for t in dict.fromkeys(expert_tasks)}
    for m, task in enumerate(expert_tasks):
        for batch in batches[task]:
            params = bank.expert_params(m, requires_grad=True)
            with torch.enable_grad():
                if estimator == "empirical":
                    out = call(params, batch)
                    objective, count = task_loss(out, batch), 1.0
                else:
                    z = logits_of(call(params, _inputs(batch))).float()
                    logp = torch.log_softmax(z, dim=-1)
                    objective, count = (logp.detach().exp().sqrt() * logp).sum(), float(z.shape[0])
                grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for name, g in zip(params, grads):
                    if g is not None:
                        stats.sums[name][m].add_(g.double().pow(2).cpu())
                for name in params:
                    stats.counts[name][m] += count
            del params, grads
    return stats.all_reduce(device)
