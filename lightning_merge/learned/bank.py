"""``ExpertBank``: the experts' task vectors for one target module, resident as frozen buffers.

For every floating parameter θ₀ of the target (tied parameters once), the bank stores each
expert's task vector δ_m = θ_m − θ₀ as a non-persistent buffer (moved by ``.to()``, left out of
checkpoints: the experts are read again from their paths). The base θ₀ is the target's own
parameter, so the resident footprint is

    base (1 copy, the target itself) + Σ_m (tensors expert m changes)      in ``storage_dtype``

Task vectors that are exactly zero (a tensor an expert did not change, e.g. every tensor but
``q_proj``/``v_proj`` for a LoRA adapter) are not stored. Inputs are read and validated by the
merge engine (:func:`~lightning_merge.engine.build_plan` / ``load_inputs``: key alignment,
LoRA adapters as exact dense deltas ``scaling · B @ A``, vocabulary truncation, NaN checks), one
tensor at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import MergePlan, TensorTask, VocabPolicy, build_plan, load_inputs
from ..errors import ConfigError
from ..sources.base import ModuleSource, Source, align
from ..sources.resolve import open_source
from ..targets.module import is_dtensor, is_sharded, local_part

log = logging.getLogger(__name__)

__all__ = ["ExpertBank", "float_parameter_names", "safe_key"]


def safe_key(name: str) -> str:
    """A tensor name usable as a buffer / ParameterDict key (no dots)."""
    return name.replace(".", "::")


def float_parameter_names(module: nn.Module) -> list[str]:
    """The floating parameters of ``module`` (tied parameters under their first name)."""
    return [n for n, p in module.named_parameters() if p.is_floating_point()]


class _Opener:
    """Opens the sources of a bank and plans them against its target (again on every call; a
    plain object, so a module holding the bank pickles, e.g. for ``ddp_spawn``)."""

    def __init__(self, experts: list[Any], base: Any, vocab_policy: VocabPolicy) -> None:
        self.experts, self.base, self.vocab_policy = experts, base, vocab_policy

    def __call__(self, target: nn.Module) -> MergePlan:
        from ..lightning.sharded import GatheredBase

        opened: list[Source] = []
        try:
            srcs = [open_source(e) for e in self.experts]
            opened.extend(srcs)
            if self.base is None:
                base_src: Source = (GatheredBase(target, "<target>") if is_sharded(target)
                                    else ModuleSource(target, label="<target>"))
            else:
                raw = open_source(self.base)
                opened.append(raw)
                base_src = align(raw, ModuleSource(target).keys())
            return build_plan(base_src, srcs, None, space="delta", vocab_policy=self.vocab_policy)
        except BaseException:
            for s in opened:
                s.close()
            raise


class _Store(nn.Module):
    """One expert's task vectors (buffers keyed by :func:`safe_key`)."""


class ExpertBank(nn.Module):
    """Task vectors δ_m of N experts for the floating parameters of ``target`` (see the module doc).

    The bank is laid out when built (names, experts, the plan's checks of files, names and
    shapes) and *read* on :meth:`load`: at once for :meth:`build` (``load=True``), or when a
    :class:`~lightning_merge.learned.LearnedMerge` is set up by its trainer, so that a target that
    the strategy shards (FSDP2, ``ModelParallelStrategy``) is read shard-local.

    Sharded targets (DTensor parameters, ``Shard(0)`` on one data-parallel mesh): each rank stores
    only the rows of θ₀ and of every δ_m that its shard of the parameter holds, read with
    ``Source.get_rows`` (a positional read of those rows of a safetensors file; for a LoRA adapter
    those rows of B times A); θ₀ is kept in the bank (the parameters then hold the merged
    weights), so per rank the footprint is (θ₀ + Σ_m changed δ_m) / world size, plus the
    parameter shard itself. A task vector that is zero on a rank's rows is not stored there.

    Args:
        target: the module whose parameters are merged (its parameters are the base θ₀).
        plan: a merge plan over the target's names (from :meth:`build`); with ``load`` it is read
            once here.
        storage_dtype: dtype of the stored task vectors (and, with ``adopt``, of the target's
            parameters); None keeps each tensor's own dtype for θ₀ and float32 for δ.
        adopt: take ownership of the target: freeze its parameters and cast them to
            ``storage_dtype``. False leaves their dtype and ``requires_grad`` alone. Either way a
            base that differs from the target's weights is copied into them.
        reopen: how to open the sources again for a later :meth:`load` (from :meth:`build`).
    """

    def __init__(self, target: nn.Module, plan: MergePlan, *, storage_dtype: torch.dtype | None = None,
                 adopt: bool = True, load: bool = True, reopen: Callable[[nn.Module], MergePlan] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_target", target)  # not a submodule: it belongs to the caller
        self.names = float_parameter_names(target)
        self.n_experts = len(plan.experts)
        self.labels = [e.label for e in plan.experts]
        self.storage_dtype, self.adopt = storage_dtype, adopt
        self.stores = nn.ModuleList(_Store() for _ in range(self.n_experts))
        self.base_store = _Store()  # this rank's θ₀ rows, on a sharded target only
        #: tensor name -> indices of the experts that store a task vector for it (on this rank)
        self.present: dict[str, list[int]] = {n: [] for n in self.names}
        #: tensor name -> (start, stop) of this rank's rows, on a sharded target
        self.rows: dict[str, tuple[int, int]] = {}
        self.loaded = False
        self._reopen = reopen
        wanted = set(self.names)
        buffers = {n for n, _ in target.named_buffers()}
        skipped = [t.name for t in plan.tasks if t.name not in wanted and t.name not in buffers and t.experts]
        if skipped:
            log.warning("%d expert tensors have no floating counterpart in the target and are ignored, e.g. %s",
                        len(skipped), skipped[:3])
        if load:
            self._fill(plan)

    @property
    def sharded(self) -> bool:
        """The target's parameters are DTensor shards (the bank holds this rank's rows)."""
        return bool(self.rows)

    def load(self) -> ExpertBank:
        """Read the task vectors now (once): this rank's rows when the target is sharded by then."""
        if self.loaded:
            return self
        if self._reopen is None:
            raise ConfigError("ExpertBank: this bank was built from a plan without a way to read it again; "
                              "build it with ExpertBank.build(...)")
        plan = self._reopen(self.target)
        try:
            self._fill(plan)
        finally:
            for s in [plan.base, *plan.experts]:
                if s is not None:
                    s.close()
        return self

    @torch.no_grad()
    def _fill(self, plan: MergePlan) -> None:
        target, wanted = self.target, set(self.names)
        sharded = any(is_dtensor(target.get_parameter(n)) for n in self.names)
        for task in plan.tasks:
            if task.name not in wanted or task.action != "merge":
                continue
            param = target.get_parameter(task.name)
            if tuple(param.shape) != tuple(task.shape):
                raise ConfigError(f"tensor '{task.name}': the experts' shape {list(task.shape)} does not match the "
                                  f"target's {list(param.shape)}; are the experts fine-tunes of this model?")
            if sharded:
                self._fill_rows(plan, task, param)
                continue
            inputs = load_inputs(plan, task)
            if not torch.equal(inputs.base.to(param.device, param.dtype), param.detach()):
                param.copy_(inputs.base.to(param.device, param.dtype))  # an explicit base replaces the target's
            self._store(task.name, inputs.experts, inputs.tensors, param.device)
        if self.adopt:
            for n in self.names:
                p = target.get_parameter(n)
                p.requires_grad_(False)
                if self.storage_dtype is not None and p.dtype != self.storage_dtype and not sharded:
                    p.data = p.data.to(self.storage_dtype)
        self.loaded = True

    def _store(self, name: str, experts: Sequence[int], deltas: Sequence[Tensor], device: torch.device) -> None:
        for m, delta in zip(experts, deltas):
            if delta.numel() == 0 or not bool(delta.any()):
                continue  # unchanged by this expert (on these rows): nothing to store
            dtype = self.storage_dtype or torch.float32
            self.stores[m].register_buffer(safe_key(name), delta.to(device, dtype), persistent=False)
            self.present[name].append(m)

    def _fill_rows(self, plan: MergePlan, task: TensorTask, param: Tensor) -> None:
        """This rank's rows of θ₀ and of every δ_m of one sharded parameter."""
        import torch.distributed as dist

        from ..lightning.sharded import local_box

        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        box = local_box(param, rank, world)
        placement = param.placements[0]
        if placement.is_shard() and placement.dim % max(param.ndim, 1) != 0:
            raise ConfigError(f"tensor '{task.name}' is sharded along dim {placement.dim}; the learned merge "
                              "supports FSDP2's row sharding (Shard(0))")
        local = local_part(param)
        start, stop = (box[0].start, box[0].stop) if box is not None and param.ndim else (0, 0 if box is None else 1)
        self.rows[task.name] = (start, stop)
        dtype = self.storage_dtype or local.dtype
        if box is None:
            self.base_store.register_buffer(safe_key(task.name), local.detach().to(dtype, copy=True),
                                            persistent=False)
            return
        if param.ndim == 0 or task.truncate or task.pad_rows is not None:  # whole tensor once, then its rows
            inputs = load_inputs(plan, task)
            rows = (lambda t: t) if param.ndim == 0 else (lambda t: t[start:stop])
            base, deltas = rows(inputs.base), [rows(t) for t in inputs.tensors]
        else:
            inputs = load_inputs(plan, task, read=lambda src, name: src.get_rows(name, start, stop))
            base, deltas = inputs.base, inputs.tensors
        self.base_store.register_buffer(safe_key(task.name), base.to(local.device, dtype), persistent=False)
        self._store(task.name, inputs.experts, deltas, local.device)

    @classmethod
    def build(cls, target: nn.Module, experts: Sequence[Any], *, base: Any = None,
              storage_dtype: torch.dtype | None = None, adopt: bool = True,
              vocab_policy: VocabPolicy = "truncate", load: bool = True) -> ExpertBank:
        """Open ``experts`` (anything :func:`~lightning_merge.sources.open_source` reads: HF
        folders, .safetensors, .ckpt, PEFT LoRA adapters, modules, state dicts) and ``base`` (None:
        the target's own weights), validate them against the target and, with ``load``, read their
        task vectors (else on :meth:`load`)."""
        plan = _Opener(list(experts), base, vocab_policy)

        first = plan(target)
        try:
            return cls(target, first, storage_dtype=storage_dtype, adopt=adopt, load=load, reopen=plan)
        finally:
            for s in [first.base, *first.experts]:
                if s is not None:
                    s.close()

    # ---- access
    @property
    def target(self) -> nn.Module:
        return self._target  # type: ignore[return-value]

    def base(self, name: str) -> Tensor:
        """θ₀ of ``name``: the target's parameter (detached), or this rank's rows of it when sharded."""
        if self.sharded:
            return self.base_store._buffers[safe_key(name)]  # type: ignore[return-value]
        return self.target.get_parameter(name).detach()

    def delta(self, m: int, name: str) -> Tensor | None:
        """δ_m of ``name`` in storage dtype, or None where expert m does not change it."""
        return self.stores[m]._buffers.get(safe_key(name))

    def deltas(self, name: str) -> tuple[list[int], list[Tensor]]:
        idx = self.present[name]
        return idx, [self.stores[m]._buffers[safe_key(name)] for m in idx]  # type: ignore[misc]

    def expert_tensor(self, m: int, name: str) -> Tensor:
        """θ_m = θ₀ + δ_m of ``name`` in float32 (a new tensor)."""
        out = self.base(name).to(torch.float32).clone()
        d = self.delta(m, name)
        if d is not None:
            out.add_(d.to(torch.float32))
        return out

    def expert_params(self, m: int, *, requires_grad: bool = False) -> dict[str, Tensor]:
        """Every θ_m of the target (float32; one model copy, built tensor by tensor)."""
        return {n: self.expert_tensor(m, n).requires_grad_(requires_grad) for n in self.names}

    def nbytes(self) -> dict[str, int]:
        """Resident bytes: ``base`` (the target's merged parameters) and ``deltas`` (all experts)."""
        base = sum(self.base(n).numel() * self.base(n).element_size() for n in self.names)
        deltas = sum(b.numel() * b.element_size() for s in self.stores for b in s.buffers())
        return {"base": base, "deltas": deltas}
