"""The in-memory inputs of a merge search: every checkpoint read once, then merged from memory.

:func:`cache_inputs` reads each expert (and ``base=`` when given) exactly once and keeps, per
expert, either

* ``space="delta"``: its task vector δ = expert − base as float32 (a LoRA adapter's dense δ as it
  is), computed by the engine's own :func:`~lightning_merge.engine.load_inputs` (key alignment,
  vocabulary truncation and NaN/Inf checks included), so a delta-space method merges exactly the
  δ it would compute from the files; a weight-space method gets base + δ (the expert's weights up
  to float32 rounding); or
* ``space="weight"``: its weights in their own dtype (used when every candidate works on weights;
  a LoRA adapter is kept as its dense δ either way).

Only the tensors the merge can write are kept: floating-point tensors that the base (the target
submodule's own names) also has. Tensors an expert lacks (a LoRA adapter lists only what it
changes) stay absent, so each candidate sees exactly the experts the engine would.

Everything lives on ``device``: ``cpu``, or the target's device (``cache_device="module"``), where
the candidates are then merged too. Memory: the base once (target dtype, plus a CPU copy to
restore the target from) and one float32 copy per expert (``space="delta"``).

Sharded targets (FSDP2, :func:`cache_sharded_inputs`): the tensors are dealt into one share per
rank (:func:`~.ranks.split_tasks`); each rank caches the full base and the experts' task vectors
of *its share only*, and keeps the backup of its own shard. Per rank, with P the model's
parameter bytes in float32, E the experts and W the ranks: about (E + 1)·P/W for the cache plus
the shard's backup. Each candidate is then merged share by share and scattered into the shards
(:func:`~.sharded.scatter_rounds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import TensorTask, build_plan, load_inputs
from ..sources.base import ModuleSource, Source, StateDictSource, align
from ..spaces import Space
from ..targets.module import WeightBackup, find_tensor
from .ranks import Comm, split_tasks

__all__ = ["SearchInputs", "cache_inputs", "cache_sharded_inputs", "module_device"]



@dataclass
class SearchInputs:
    """The cached base and experts of a search, and the backup that restores the target."""

    base: StateDictSource
    experts: list[StateDictSource]
    backup: WeightBackup
    device: torch.device
    space: Space
    #: sharded targets: the tensors each rank caches and merges (None: not sharded)
    shares: list[list[TensorTask]] | None = None
    comm: Comm | None = None

    def nbytes(self) -> int:
        """Bytes held by the expert cache (the base and the backup not counted)."""
        return sum(e.get(k).numel() * e.get(k).element_size() for e in self.experts for k in e.keys())


def _base_tensors(base: Source | None, keys: list[str], backup: WeightBackup) -> dict[str, torch.Tensor]:
    if base is None:
        return dict(backup.saved)
    aligned = align(base, keys)
    return {k: aligned.get(k).detach().to("cpu", copy=True) for k in aligned.keys() if k in keys}


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def cache_inputs(
    target: nn.Module,
    experts: Sequence[Source],
    *,
    base: Source | None = None,
    space: Space = "delta",
    device: torch.device | str = "cpu",
    label: str = "<module before the search>",
) -> SearchInputs:
    """Read ``experts`` (open sources; not closed here) and ``base`` once into a :class:`SearchInputs`.

    ``base=None``: the target's own weights now. Raises the engine's errors (missing names, shapes,
    NaN/Inf) naming the source at fault.
    """
    device = torch.device(device)
    keys = ModuleSource(target).keys()
    backup = WeightBackup(target, keys)  # CPU copy of the pre-merge weights: restores every candidate
    base_cpu = _base_tensors(base, keys, backup)
    base_src = StateDictSource(base_cpu, label=base.label if base is not None else label)
    wanted = [k for k in base_src.keys() if base_cpu[k].dtype.is_floating_point]

    cached: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    spaces = ["delta" if space == "delta" else e.space for e in experts]
    if space == "delta":
        plan = build_plan(base_src, list(experts), None, space="delta", device=device)
        want = set(wanted)
        for task in plan.tasks:
            if task.action != "merge" or task.name not in want or not task.experts:
                continue
            inputs = load_inputs(plan, task)  # δ of each expert that has the tensor, float32 on device
            for i, delta in zip(task.experts, inputs.tensors):
                cached[i][task.name] = delta
    else:
        for i, src in enumerate(experts):
            src.validate_against(base_src)
            aligned = align(src, base_src.keys())
            for k in aligned.keys():
                if k in base_cpu and base_cpu[k].dtype.is_floating_point:
                    cached[i][k] = aligned.get(k).detach().to(device, copy=True)
    on_device = base_cpu if device.type == "cpu" else {k: v.to(device) for k, v in base_cpu.items()}
    return SearchInputs(
        base=StateDictSource(on_device, label=base_src.label),
        experts=[StateDictSource(c, label=e.label, space=k) for c, e, k in zip(cached, experts, spaces)],
        backup=backup, device=device, space=space,
    )


def cache_sharded_inputs(
    target: nn.Module,
    experts: Sequence[Source],
    comm: Comm,
    *,
    base: Source | None = None,
    space: Space = "delta",
    device: torch.device | str = "cpu",
    label: str = "<module before the search>",
) -> SearchInputs:
    """:func:`cache_inputs` for a sharded ``target``: every rank caches only its share of the
    tensors, full (see the module doc); ``base=None`` gathers the share's base from the shards."""
    from .sharded import GatheredBase, gather_share

    device = torch.device(device)
    keys = ModuleSource(target).keys()
    backup = WeightBackup(target, keys)  # this rank's shard only
    gathered = GatheredBase(target, label) if base is None else None
    base_src: Source = gathered if gathered is not None else align(base, keys)  # type: ignore[arg-type]
    plan = build_plan(base_src, list(experts), None, space="delta", device=device)
    tasks = [t for t in plan.tasks if t.action == "merge" and t.experts and base_src.dtype(t.name).is_floating_point
             and find_tensor(target, t.name) is not None]
    shares = split_tasks(tasks, comm.world)
    mine = shares[comm.rank]
    if gathered is not None:
        gathered.full = gather_share(comm, target, shares)
    base_cpu = {t.name: base_src.get(t.name).detach().to("cpu", copy=True) for t in mine}
    cached: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    spaces = ["delta" if space == "delta" else e.space for e in experts]
    for task in mine:
        if space == "delta":
            inputs = load_inputs(plan, task)
            for i, delta in zip(task.experts, inputs.tensors):
                cached[i][task.name] = delta
        else:
            for i in task.experts:
                cached[i][task.name] = plan.experts[i].get(task.name).detach().to(device, copy=True)
    if gathered is not None:
        gathered.full.clear()
    on_device = base_cpu if device.type == "cpu" else {k: v.to(device) for k, v in base_cpu.items()}
    return SearchInputs(
        base=StateDictSource(on_device, label=base_src.label),
        experts=[StateDictSource(c, label=e.label, space=k) for c, e, k in zip(cached, experts, spaces)],
        backup=backup, device=device, space=space, shares=shares, comm=comm,
    )
