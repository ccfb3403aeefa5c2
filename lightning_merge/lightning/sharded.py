"""Merging into a sharded module (FSDP2 ``fully_shard``: DTensor parameters), with no full model on any rank.

Two routes, chosen per method and tensor:

* *Rows where they live* (methods with ``elementwise = True``: ``linear``, ``task_arithmetic``):
  every merged element depends only on the same element of the inputs, so each rank reads only
  the rows it holds from every expert (``Source.get_rows``: a positional read of those rows of a
  safetensors file; for a LoRA adapter, those rows of B times A), takes the base rows from its own
  shard, merges and writes them. Nothing is exchanged.
* *Owner merges one tensor, then scatters* (every other method: top-k thresholds, norms and
  rescales, ranks within a row, random streams over the tensor, statistics passes), below.

The owner route. The plan's tensors are dealt into one share per
rank (:func:`~.ranks.split_tasks`, balanced by size). The work runs in rounds; in round k every
rank merges the k-th tensor of its share, in parallel, with the same engine code as
:func:`~lightning_merge.merge_models` (so every registered method gives the 1-process result with
the same seed, bit for bit on the same device type), then sends each other rank exactly the part
of the merged tensor that rank holds (its DTensor box, from the mesh and placements) and receives
its own parts of the others' tensors, point to point. Uneven shards and empty shards are handled
by the boxes; a rank with an empty box sends and receives nothing for that tensor.

Statistics passes (adaptive-RMS, DPPA) run on each rank's share and are combined with
``all_gather_object``, as under DDP.

The base. With ``base=None`` the module's own weights are the base: before merging, each rank
collects the full base tensors of its share from the others' shards (the same exchange in
reverse). With a base path, the owner reads the base tensor from the file.

Per-rank memory, P the model's parameter bytes and W the world size: the module's shard (P/W), the
backup of that shard (P/W, CPU; ``keep_backup=False`` drops it), the full base tensors of the
rank's share when the base is the module (about P/W, freed one by one as they are merged), and
the engine's streaming bound for the tensor being merged ((experts + 2) float32 copies of it).
Expert files are read whole, one tensor at a time, by the tensor's owner only.

A failure on one rank (a NaN in an expert tensor, a bad file) is reported to every rank at the
next round boundary, so no rank waits forever in a receive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..engine import MergePlan, TensorTask, compute_statistics, load_inputs, merge_task, method_for
from ..errors import MergeError
from ..sources.base import ModuleSource, Source
from ..targets.module import find_tensor, is_dtensor, local_part, reshard
from .ranks import Comm, _Failed, split_tasks

log = logging.getLogger(__name__)

__all__ = ["GatheredBase", "gather_share", "local_box", "merge_into_shards", "scatter_rounds"]

Box = tuple[slice, ...]


def _chunk(n: int, world: int, r: int) -> tuple[int, int]:
    """(start, length) of rank ``r``'s piece when ``n`` rows are split as ``Shard`` splits them
    (``torch.chunk``: pieces of ceil(n / world), the last ones shorter or empty)."""
    size = -(-n // world) if n else 0
    start = min(r * size, n)
    return start, max(min(start + size, n) - start, 0)


def _boxes(t: Tensor, world: int) -> list[Box | None]:
    """Per rank, the region of the global tensor it holds locally (None: nothing).

    A plain tensor is held whole by every rank. A DTensor on a 1-D mesh over all ranks with
    ``Shard(d)`` holds ``torch.chunk``'s piece d of rank's mesh position; ``Replicate()`` holds it
    whole. The computed box of this rank is checked against its actual local tensor."""
    full = tuple(slice(0, s) for s in t.shape)
    if not is_dtensor(t):
        return [full] * world
    mesh = t.device_mesh
    if mesh.ndim != 1 or mesh.size() != world or len(t.placements) != 1:
        raise MergeError(f"a sharded tensor lives on a {mesh.ndim}-D device mesh of {mesh.size()} ranks with "
                         f"placements {t.placements}; merging supports one data-parallel mesh over all {world} "
                         "ranks (ModelParallelStrategy with tensor_parallel_size=1)")
    placement = t.placements[0]
    ranks = mesh.mesh.flatten().tolist()
    boxes: list[Box | None] = [None] * world
    for pos, rank in enumerate(ranks):
        if placement.is_replicate():
            boxes[rank] = full
        elif placement.is_shard():
            d = placement.dim % t.ndim
            start, length = _chunk(t.shape[d], world, pos)
            if length:
                boxes[rank] = tuple(slice(start, start + length) if i == d else full[i] for i in range(t.ndim))
        else:
            raise MergeError(f"a sharded tensor has placement {placement}; merging supports Shard and Replicate")
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    want = tuple(s.stop - s.start for s in boxes[me]) if boxes[me] is not None else None
    got = tuple(t.to_local().shape)
    if (want or None) != (got if t.to_local().numel() else None):
        raise MergeError(f"a sharded tensor of shape {list(t.shape)} holds a local piece of shape {list(got)} on "
                         f"rank {me}, not the expected {list(want or [0])}; this sharding layout is not supported")
    return boxes


def local_box(t: Tensor, rank: int, world: int) -> Box | None:
    """The region of ``t`` that ``rank`` holds (None: an empty shard)."""
    return _boxes(t, world)[rank]


class GatheredBase(Source):
    """The module's own weights as the base of a sharded merge: names, global shapes and dtypes of
    the target's tensors; :meth:`get` returns a full tensor collected for this rank's share."""

    def __init__(self, target: nn.Module, label: str):
        module = ModuleSource(target)
        self.target, self.label = target, label
        self._names = module.keys()
        self.aliases = module.aliases  # tied parameters, as the unsharded base would report them
        self.full: dict[str, Tensor] = {}

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(find_tensor(self.target, key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return find_tensor(self.target, key).dtype

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        """This rank's own rows, straight from its shard (the element-wise route)."""
        return local_part(find_tensor(self.target, key)).detach().to("cpu", copy=True)

    def get(self, key: str) -> Tensor:
        try:
            return self.full[key]
        except KeyError:
            raise MergeError(f"sharded merge: the base tensor '{key}' was not collected on this rank "
                             "(a bug: each rank reads only the tensors of its share)") from None


def _check_round(comm: Comm, failure: _Failed | None) -> None:
    comm.gather(failure)  # raises PeerFailed when any rank (this one included) reported a failure


def _exchange(comm: Comm, target: nn.Module, round_tasks: Sequence[tuple[int, TensorTask]],
              merged: Tensor | None, *, gather: bool) -> Tensor | None:
    """One round of point-to-point transfers.

    ``gather=False`` (scatter): each owner sends every rank its box of the owner's merged tensor
    and writes its own box; the others receive theirs and write them. ``gather=True``: each rank
    sends its box of every owner's tensor to that owner, who assembles the full tensor (returned)."""
    dist, me, dev = comm.dist, comm.rank, comm.device
    ops, writes, assembled = [], [], None
    for owner, task in round_tasks:
        t = find_tensor(target, task.name)
        boxes = _boxes(t, comm.world)
        local = local_part(t)
        if gather:
            if me == owner:
                assembled = torch.empty(task.shape, dtype=t.dtype, device=dev)
                if boxes[me] is not None:
                    assembled[boxes[me]].copy_(local)
                for r, box in enumerate(boxes):
                    if r != me and box is not None:
                        view = assembled[box]
                        buf = torch.empty(view.shape, dtype=t.dtype, device=dev)
                        ops.append(dist.irecv(buf, src=r))
                        writes.append((view, buf))
            elif boxes[me] is not None:
                ops.append(dist.isend(local.detach().to(dev).contiguous(), dst=owner))
        else:
            if me == owner:
                assert merged is not None
                src = merged.to(dev)
                for r, box in enumerate(boxes):
                    if box is None:
                        continue
                    if r == me:
                        writes.append((local, src[box]))
                    else:
                        ops.append(dist.isend(src[box].contiguous(), dst=r))
            elif boxes[me] is not None:
                buf = torch.empty(local.shape, dtype=task.out_dtype, device=dev)
                ops.append(dist.irecv(buf, src=owner))
                writes.append((local, buf))
    for op in ops:
        op.wait()
    with torch.no_grad():
        for dst, src in writes:
            dst.copy_(src.to(dst.device, dst.dtype))
    return assembled.cpu() if assembled is not None else None



def _round(shares: Sequence[Sequence[TensorTask]], k: int) -> list[tuple[int, TensorTask]]:
    """(owner, task) of the k-th tensor of every share that has one."""
    return [(o, s[k]) for o, s in enumerate(shares) if k < len(s)]


def gather_share(comm: Comm, target: nn.Module, shares: Sequence[Sequence[TensorTask]]) -> dict[str, Tensor]:
    """The full tensors of this rank's share, collected from every rank's shard of the module
    (CPU, the module's dtype), in rounds like the merge's."""
    reshard(target)
    rounds = max((len(s) for s in shares), default=0)
    mine = shares[comm.rank]
    full: dict[str, Tensor] = {}
    for k in range(rounds):
        got = _exchange(comm, target, _round(shares, k), None, gather=True)
        if k < len(mine):
            full[mine[k].name] = got
    return full


def scatter_rounds(plan: MergePlan, shares: Sequence[Sequence[TensorTask]], target: nn.Module, comm: Comm,
                   gathered: GatheredBase | None = None) -> None:
    """Merge this rank's share of ``shares`` with ``plan`` (which must hold those tensors), one
    tensor a round, and write every rank's boxes of every merged tensor into the shards."""
    reshard(target)
    rounds = max((len(s) for s in shares), default=0)
    mine = shares[comm.rank]
    for k in range(rounds):
        merged, failure = None, None
        if k < len(mine):
            try:
                merged = merge_task(plan, plan.task(mine[k].name))
            except Exception as e:  # reported to every rank before anyone waits in a receive
                failure = _Failed(comm.rank, f"{type(e).__name__}: {e}")
                if not comm.on:
                    raise
            if gathered is not None:
                gathered.full.pop(mine[k].name, None)
        if comm.on:
            _check_round(comm, failure)
        _exchange(comm, target, _round(shares, k), merged, gather=False)


def _rowslocal_part(plan: MergePlan, task: TensorTask, target: nn.Module, world: int) -> bool:
    """The element-wise route applies: an element-wise method, a tensor split by rows (or whole),
    and no vocabulary truncation or padding."""
    method, _ = method_for(plan, task.name)
    if not method.elementwise or task.action != "merge" or task.truncate or task.pad_rows is not None:
        return False
    t = find_tensor(target, task.name)
    if t is None or t.ndim == 0:
        return False
    return not is_dtensor(t) or (len(t.placements) == 1 and (t.placements[0].is_replicate() or (
        t.placements[0].is_shard() and t.placements[0].dim % max(t.ndim, 1) == 0)))


def merge_into_shards(plan: MergePlan, tasks: Sequence[TensorTask], target: nn.Module, comm: Comm,
                      gathered: GatheredBase | None) -> list[list[TensorTask]]:
    """Merge ``tasks`` of ``plan`` into the sharded ``target`` in place (see the module doc).

    ``gathered``: the plan's base when the base is the module itself (its share is collected
    first). Returns the shares (the tensors each rank merged)."""
    local = [t for t in tasks if _rowslocal_part(plan, t, target, comm.world)]
    names = {t.name for t in local}
    shares = split_tasks([t for t in tasks if t.name not in names], comm.world)
    mine = shares[comm.rank]
    reshard(target)
    failure = None
    try:
        for task in local:  # element-wise methods: each rank merges its own rows, reading only those
            box = _boxes(find_tensor(target, task.name), comm.world)[comm.rank]
            if box is None:
                continue
            start, stop = box[0].start, box[0].stop
            inputs = load_inputs(plan, task, read=lambda src, name, a=start, b=stop: src.get_rows(name, a, b))
            merged = merge_task(plan, task, inputs)
            with torch.no_grad():
                dst = local_part(find_tensor(target, task.name))
                dst.copy_(merged.to(dst.device, dst.dtype))
    except Exception as e:  # reported to every rank before anyone waits in the owner route's exchanges
        if not comm.on:
            raise
        failure = _Failed(comm.rank, f"{type(e).__name__}: {e}")
    if comm.on and local:
        _check_round(comm, failure)
    if gathered is not None:
        gathered.full = gather_share(comm, target, shares)
    if plan.method.statistics_passes > 0:
        compute_statistics(plan, names=[t.name for t in mine], gather=comm.gather if comm.on else None)
    scatter_rounds(plan, shares, target, comm, gathered)
    return shares
