"""In-place merge target: write merged tensors into a live ``nn.Module``, keeping a way back.

Nothing is written until every merged tensor exists, so a merge that fails part-way (NaN in an
input, a bad hyperparameter) leaves the module exactly as it was. :class:`WeightBackup` holds a CPU
copy of the replaced tensors so a merge can be undone after the fact (e.g. when a merge candidate
is rejected).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import IncompatibleTensorError

log = logging.getLogger(__name__)


def find_tensor(module: nn.Module, name: str) -> Tensor | None:
    """The parameter or buffer ``name`` of ``module``, or None."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        pass
    try:
        return module.get_buffer(name)
    except AttributeError:
        return None


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 submodule of ``module`` back into its sharded state (after a forward without
    backward, e.g. a validation epoch, the root keeps its parameters unsharded), so that the
    registered parameters are the DTensor shards that merges read and write."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_dtensor(t: object) -> bool:
    """A DTensor (FSDP2 shard, tensor-parallel piece), or a parameter wrapping one."""
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a DTensor (FSDP2, tensor parallelism)."""
    return any(is_dtensor(p) for p in module.parameters())


def local_part(t: Tensor) -> Tensor:
    """A DTensor's local shard; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


class WeightBackup:
    """CPU copies of some of a module's tensors, restorable with :meth:`restore`.

    For a sharded module (DTensor parameters) each rank keeps only its own shard, and restores it."""

    def __init__(self, module: nn.Module, names: Iterable[str]):
        self.module = module
        self.saved: dict[str, Tensor] = {}
        reshard(module)
        for name in names:
            t = find_tensor(module, name)
            if t is not None:
                self.saved[name] = local_part(t.detach()).to("cpu", copy=True)

    @property
    def nbytes(self) -> int:
        """Bytes held (this rank's)."""
        return sum(v.numel() * v.element_size() for v in self.saved.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved values back (in place, so optimizers and tied weights stay valid)."""
        reshard(self.module)
        for name, value in self.saved.items():
            t = find_tensor(self.module, name)
            if t is not None:
                local = local_part(t)
                local.copy_(value.to(local.device, local.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.saved)


@torch.no_grad()
def load_into_module(
    module: nn.Module,
    tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
    *,
    keep_backup: bool = True,
    strict: bool = False,
) -> WeightBackup | None:
    """Copy merged tensors into ``module`` in place (each keeps its device and dtype).

    All tensors are collected (and shape-checked) before the first write. Names the module lacks
    are skipped with a warning, or raise with ``strict=True``.
    """
    items = dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
    targets: dict[str, Tensor] = {}
    missing = []
    for name, value in items.items():
        t = find_tensor(module, name)
        if t is None:
            missing.append(name)
            continue
        if tuple(t.shape) != tuple(value.shape):
            raise IncompatibleTensorError(
                f"merged tensor '{name}' has shape {list(value.shape)} but the module's has {list(t.shape)}"
            )
        targets[name] = t
    if missing:
        if strict:
            raise IncompatibleTensorError(f"the module has no tensors named {missing[:5]} (strict=True)")
        log.warning("%d merged tensors have no counterpart in the module and were skipped, e.g. %s",
                    len(missing), missing[:3])
    backup = WeightBackup(module, targets) if keep_backup else None
    for name, t in targets.items():
        t.copy_(items[name].to(t.device, t.dtype))
    return backup
