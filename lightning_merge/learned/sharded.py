"""Learned merges on a sharded model: FSDP2 through Lightning's ``ModelParallelStrategy``.

Under ``ModelParallelStrategy`` :class:`~lightning_merge.learned.LearnedMerge` shards its wrapped
model in ``configure_model`` (``fully_shard`` on every transformer block, then on the model, over
the data-parallel mesh). A model built from a folder is a meta-device skeleton until then: each
rank allocates its shards and reads their rows of the folder's tensors (:mod:`.meta`). Only then
are the experts read: each rank's :class:`~lightning_merge.learned.bank.ExpertBank` holds the rows
of θ₀ and of every δ_m that its parameter shards hold. The coefficients stay ordinary (replicated)
parameters outside the shards.

A step cannot run the model through ``functional_call`` with θ*(c) (FSDP2 gathers the parameters
it manages), so the merged weights are written into the shards and the gradient is taken by the
chain rule (:mod:`.combine`, equation (2)):

    1. write θ*(c) = O + Σ_k C_k ⊙ X_k into every rank's shard (no graph);
    2. forward and backward through the sharded model: FSDP2 leaves each rank the rows of the
       data-parallel mean gradient g = ∂ℓ/∂θ* of its shard;
    3. ∂ℓ/∂c = Σ_ranks Σ_k (∂C_k/∂c)ᵀ reduce(g_rank ⊙ X_k,rank): each rank pulls its rows' part back
       through the coefficient function (:meth:`~.coefficients.Coefficients.pullback`), and the
       parts are summed over the ranks with one all-reduce; the regularizers' gradients, computed
       from the replicated coefficients, are added once.

This is the same gradient as the unsharded step up to float32 summation order (the reductions
over rows run per rank, then across ranks). The teacher forwards of ``objective="dam"`` write
θ₀ + δ_m into the shards first; the merged weights are written back before the student forwards,
so the backward (which gathers the shards again) sees θ*.

Per rank: the parameter shards (P / W, float32 while merged), θ₀'s rows and the changed δ_m's
rows in ``storage_dtype`` ((1 + Σ_m changed) P / W), their gradient shards (P / W), and the
coefficients with their Adam state (replicated). Exports gather one tensor at a time to rank 0.
Distributed checkpoints also hold the target's shards (Lightning's loader needs every key of the
model); the coefficients are what is restored, and θ* is written again from them before use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..targets.module import local_part, reshard
from .meta import has_meta_parameters, load_local_rows

log = logging.getLogger(__name__)

__all__ = ["ShardedRunner", "blocks_of", "gather_merged", "mesh_device", "pull_back", "shard_model", "write_expert",
           "write_merged"]


def blocks_of(model: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: those of the model's ``_no_split_modules`` classes (Hugging
    Face's transformer blocks), else the entries of the target's ``nn.ModuleList``\\ s."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in target.modules() if type(m).__name__ in classes]
    if found:
        return found
    return [m for lst in target.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def mesh_device(mesh: Any) -> torch.device:
    """This rank's device on ``mesh`` (where ``fully_shard`` puts the shards)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def shard_model(lm: Any, mesh: Any) -> None:
    """``fully_shard`` the wrapped model of ``lm`` (a LearnedMerge) over ``mesh``'s data-parallel
    dimension (a meta-device skeleton: then allocate the shards and read their rows of the folder's
    tensors), make the target's parameters differentiable (their gradients carry the chain rule)
    and read the bank's rows."""
    from torch.distributed.fsdp import fully_shard

    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError("LearnedMerge: ModelParallelStrategy with tensor_parallel_size > 1 is not supported; "
                          "use tensor_parallel_size=1 (sharded data parallelism)")
    dp = mesh["data_parallel"] if "data_parallel" in names else mesh
    target = lm.bank.target
    for p in target.parameters():  # FSDP2 casts nothing; the shards keep the loaded dtype
        p.requires_grad_(False)
    for block in blocks_of(lm.model, target):
        fully_shard(block, mesh=dp)
    fully_shard(lm.model, mesh=dp)
    if has_meta_parameters(lm.model):  # a skeleton (see .meta): each rank reads its rows of the folder's tensors
        read = load_local_rows(lm.model, lm.model_path, mesh_device(dp))
        log.info("LearnedMerge: read this rank's rows of '%s' (%.2f MB)", lm.model_path, read / 2**20)
    lm.bank.load()
    for n in lm.bank.names:  # after load (which freezes what it adopts): the gradients carry the chain rule
        target.get_parameter(n).requires_grad_(True)
    foot = lm.bank.nbytes()
    log.info("LearnedMerge: model sharded over %d ranks; this rank holds θ₀ %.1f MB and task vectors %.1f MB",
             dp.size(), foot["base"] / 2**20, foot["deltas"] / 2**20)


@torch.no_grad()
def _write(root: nn.Module, bank: Any, value: Any) -> None:
    reshard(root)
    for n in bank.names:
        dst = local_part(bank.target.get_parameter(n))
        if dst.numel():
            dst.copy_(value(n).to(dst.device, dst.dtype))


def write_merged(lm: Any) -> None:
    """θ*(c) into every rank's shards (no graph)."""
    _write(lm.model, lm.bank, lambda n: lm.coefficients.merged(lm.bank, n).detach())


def write_expert(lm: Any, m: int) -> None:
    """θ₀ + δ_m (expert m) into every rank's shards."""
    _write(lm.model, lm.bank, lambda n: lm.bank.expert_tensor(m, n))


class ShardedRunner:
    """The Sens-Merging calibration runner (:class:`~lightning_merge.learned.sens.FunctionalRunner`'s
    methods) on an FSDP2 module: expert m is written into the shards (θ₀ rows + δ_m rows of this
    rank), run forward and backward through the sharded module, and each rank reads |w ⊙ g| of its
    rows; :meth:`total` sums the sensitivities over the ranks. Every rank runs the same calibration
    batches (the data module's own loaders), so FSDP2's mean gradient is the 1-process gradient.
    :meth:`close` writes θ₀ back and restores ``requires_grad``.

    ``target`` must be an FSDP2 module (``fully_shard`` applied to it): its forward gathers what it
    holds. Per rank: the bank's rows ((1 + Σ_m changed δ_m) P / W) and the gradient shards (P / W)."""

    def __init__(self, target: nn.Module, bank: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(target, FSDPModule):
            raise ConfigError(f"Sens-Merging calibration on a sharded module needs the merge target "
                              f"({type(target).__name__}) to be an FSDP2 module itself (fully_shard(target)); "
                              "shard it that way, or pass precomputed factors=...")
        self.target, self.bank, self.device = target, bank, device
        self.grad_flags = {n: target.get_parameter(n).requires_grad for n in bank.names}
        for p in target.parameters():
            p.grad = None

    def _run(self, inputs: Any) -> Any:
        moved = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        return self.target(**moved)

    def expert_grads(self, m: int, batch: Any) -> tuple[Tensor, list[tuple[str, Tensor, Tensor]]]:
        from .objectives import logits_of, task_loss

        _write(self.target, self.bank, lambda n: self.bank.expert_tensor(m, n))
        for n in self.bank.names:
            self.target.get_parameter(n).requires_grad_(True)
        with torch.enable_grad():
            out = self._run(batch)
            task_loss(out, batch).backward()
        found = []
        for n in self.bank.names:
            p = self.target.get_parameter(n)
            if p.grad is not None and local_part(p.grad).numel():
                found.append((n, self.bank.expert_tensor(m, n), local_part(p.grad).detach().to(torch.float32)))
        for p in self.target.parameters():
            p.grad = None
        return logits_of(out).detach().float(), found

    @torch.no_grad()
    def expert_logits(self, i: int, inputs: Any) -> Tensor:
        from .objectives import logits_of

        _write(self.target, self.bank, lambda n: self.bank.expert_tensor(i, n))
        return logits_of(self._run(inputs)).float()

    def total(self, sens: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return sens
        dev = self.device if "nccl" in str(dist.get_backend()) else torch.device("cpu")
        buf = sens.to(dev)
        dist.all_reduce(buf)
        return buf.to(sens.device)

    def close(self) -> None:
        _write(self.target, self.bank, self.bank.base)
        for n, flag in self.grad_flags.items():
            self.target.get_parameter(n).requires_grad_(flag)


def pull_back(lm: Any) -> None:
    """Step 3 of the module doc: the coefficients' gradients from the shards' gradients (then
    dropped), summed over the ranks and added to the gradients already there (the regularizers')."""
    import torch.distributed as dist

    target, coeffs = lm.bank.target, lm.coefficients
    total: Tensor | None = None
    for n in lm.bank.names:
        p = target.get_parameter(n)
        if p.grad is None:
            continue
        g = local_part(p.grad)
        if g.numel():
            part = coeffs.pullback(lm.bank, n, g)
            total = part if total is None else total + part
        p.grad = None
    params = [p for p in coeffs.parameters() if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(params)
    if total is not None and total.requires_grad:
        grads = list(torch.autograd.grad(total, params, allow_unused=True))
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = lm.trainer.strategy.root_device if "nccl" in str(dist.get_backend()) else torch.device("cpu")
        buf = flat.to(dev)
        dist.all_reduce(buf)
        flat = buf.to(flat.device)
    offset = 0
    for p in params:
        g = flat[offset:offset + p.numel()].reshape(p.shape)
        offset += p.numel()
        p.grad = g.clone() if p.grad is None else p.grad + g


@torch.no_grad()
def gather_merged(lm: Any, dtype: torch.dtype | None, *, target_only: bool = False) -> Iterator[tuple[str, Tensor]]:
    """``(name, full tensor)`` of the merged model, gathered one tensor at a time (a collective:
    every rank iterates; the tensors are meaningful on every rank, rank 0 writes them)."""
    write_merged(lm)
    root = lm.bank.target if target_only else lm.model
    for key, value in root.state_dict().items():
        t = value.full_tensor() if hasattr(value, "full_tensor") else value.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        yield key, t.cpu().contiguous()
