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
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import MergePlan, VocabPolicy, build_plan, load_inputs
from ..errors import ConfigError
from ..methods.linear import TaskArithmetic
from ..sources.base import ModuleSource, Source, align
from ..sources.resolve import open_source

log = logging.getLogger(__name__)

__all__ = ["ExpertBank", "float_parameter_names", "safe_key"]


def safe_key(name: str) -> str:
    """A tensor name usable as a buffer / ParameterDict key (no dots)."""
    return name.replace(".", "::")


def float_parameter_names(module: nn.Module) -> list[str]:
    """The floating parameters of ``module`` (tied parameters under their first name)."""
    return [n for n, p in module.named_parameters() if p.is_floating_point()]


class _Store(nn.Module):
    """One expert's task vectors (buffers keyed by :func:`safe_key`)."""


class ExpertBank(nn.Module):
    """Task vectors δ_m of N experts for the floating parameters of ``target`` (see the module doc).

    Args:
        target: the module whose parameters are merged (its parameters are the base θ₀).
        plan: a merge plan over the target's names (from :meth:`build`), read once here.
        storage_dtype: dtype of the stored task vectors (and, with ``adopt``, of the target's
            parameters); None keeps each tensor's own dtype for θ₀ and float32 for δ.
        adopt: take ownership of the target: freeze its parameters and cast them to
            ``storage_dtype``. False leaves their dtype and ``requires_grad`` alone. Either way a
            base that differs from the target's weights is copied into them.
    """

    def __init__(self, target: nn.Module, plan: MergePlan, *, storage_dtype: torch.dtype | None = None,
                 adopt: bool = True) -> None:
        super().__init__()
        object.__setattr__(self, "_target", target)  # not a submodule: it belongs to the caller
        self.names = float_parameter_names(target)
        self.n_experts = len(plan.experts)
        self.labels = [e.label for e in plan.experts]
        self.stores = nn.ModuleList(_Store() for _ in range(self.n_experts))
        #: tensor name -> indices of the experts that store a task vector for it
        self.present: dict[str, list[int]] = {n: [] for n in self.names}
        wanted = set(self.names)
        buffers = {n for n, _ in target.named_buffers()}
        skipped = [t.name for t in plan.tasks if t.name not in wanted and t.name not in buffers and t.experts]
        if skipped:
            log.warning("%d expert tensors have no floating counterpart in the target and are ignored, e.g. %s",
                        len(skipped), skipped[:3])
        for task in plan.tasks:
            if task.name not in wanted or task.action != "merge":
                continue
            inputs = load_inputs(plan, task)
            param = target.get_parameter(task.name)
            if tuple(param.shape) != tuple(task.shape):
                raise ConfigError(f"tensor '{task.name}': the experts' shape {list(task.shape)} does not match the "
                                  f"target's {list(param.shape)}; are the experts fine-tunes of this model?")
            with torch.no_grad():  # an explicit base replaces the target's weights
                if not torch.equal(inputs.base.to(param.device, param.dtype), param.detach()):
                    param.copy_(inputs.base.to(param.device, param.dtype))
            for m, delta in zip(inputs.experts, inputs.tensors):
                if not bool(delta.any()):
                    continue  # unchanged by this expert: nothing to store
                dtype = storage_dtype or torch.float32
                self.stores[m].register_buffer(safe_key(task.name), delta.to(param.device, dtype), persistent=False)
                self.present[task.name].append(m)
        if adopt:
            for n in self.names:
                p = target.get_parameter(n)
                p.requires_grad_(False)
                if storage_dtype is not None and p.dtype != storage_dtype:
                    p.data = p.data.to(storage_dtype)

    @classmethod
    def build(cls, target: nn.Module, experts: Sequence[Any], *, base: Any = None,
              storage_dtype: torch.dtype | None = None, adopt: bool = True,
              vocab_policy: VocabPolicy = "truncate") -> ExpertBank:
        """Open ``experts`` (anything :func:`~lightning_merge.sources.open_source` reads: HF
        folders, .safetensors, .ckpt, PEFT LoRA adapters, modules, state dicts) and ``base`` (None:
        the target's own weights), validate them against the target and read their task vectors."""
        opened: list[Source] = []
        try:
            srcs = [open_source(e) for e in experts]
            opened.extend(srcs)
            keys = ModuleSource(target).keys()
            if base is None:
                base_src: Source = ModuleSource(target, label="<target>")
            else:
                raw = open_source(base)
                opened.append(raw)
                base_src = align(raw, keys)
            plan = build_plan(base_src, srcs, TaskArithmetic(), vocab_policy=vocab_policy)
            return cls(target, plan, storage_dtype=storage_dtype, adopt=adopt)
        finally:
            for s in opened:
                s.close()

    # ---- access
    @property
    def target(self) -> nn.Module:
        return self._target  # type: ignore[return-value]

    def base(self, name: str) -> Tensor:
        """θ₀ of ``name`` (the target's parameter, detached)."""
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
