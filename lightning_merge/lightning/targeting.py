"""Which submodule of a LightningModule a ``MergeCallback`` merges into, and whether it can.

:func:`find_target` matches the experts' tensor names against every submodule's (with the engine's
own key alignment) and keeps the deepest submodule matching the most names; :func:`check_materialized`
refuses targets that are not plain full tensors at ``setup`` (meta device, FSDP-wrapped, ZeRO-3
partitioned, DTensor-sharded), naming the strategy.
"""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..errors import ConfigError, SourceError
from ..sources.base import ModuleSource, Source, align
from ..targets.module import is_dtensor


class MergeSetupError(ConfigError, MisconfigurationException):
    """The Trainer, strategy or module cannot take the merge (e.g. the target is not materialized)."""


def match_count(expert: Source, keys: list[str]) -> int:
    """How many of ``expert``'s tensor names map onto ``keys`` (the engine's own key alignment)."""
    try:
        aligned = align(expert, keys)
    except SourceError:
        return 0
    return len(set(aligned.keys()).intersection(keys))


def find_target(root: nn.Module, expert: Source, target: str | None) -> tuple[str, nn.Module]:
    """The submodule of ``root`` whose tensor names match ``expert``'s (see :class:`MergeCallback`)."""
    hint = ""
    if isinstance(root, pl.LightningModule) and is_overridden("configure_model", root):
        hint = (" Note: this module overrides configure_model(), which Lightning calls after setup(): "
                "modules created there do not exist yet when MergeCallback merges; create the merge "
                "target in __init__.")
    if target is not None:
        try:
            module = root if target in ("", ".") else root.get_submodule(target)
        except AttributeError:
            children = [n for n, _ in root.named_children()]
            raise MergeSetupError(
                f"MergeCallback: target='{target}' is not a submodule of {type(root).__name__} "
                f"(its children: {children}).{hint}"
            ) from None
        keys = list(ModuleSource(module).keys())
        if match_count(expert, keys) == 0:
            raise MergeSetupError(
                f"MergeCallback: none of the tensor names of {expert.label} (e.g. {sorted(expert.keys())[:3]}) "
                f"match target='{target}' (names like {sorted(keys)[:3]}); is it the right submodule?"
            )
        return target, module
    root_names = [n for n, _ in itertools.chain(root.named_parameters(), root.named_buffers())]
    candidates: list[tuple[str, nn.Module, list[str]]] = []
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        keys = [k[len(prefix):] for k in root_names if k.startswith(prefix)]
        if keys:
            candidates.append((name, module, keys))
    candidates.sort(key=lambda c: -len(c[2]))
    best, scored = 0, []
    for name, module, keys in candidates:
        if len(keys) < best:
            break  # a smaller module cannot match more names
        hits = match_count(expert, keys)
        scored.append((name, module, hits, len(keys)))
        best = max(best, hits)
    if not candidates:
        raise MergeSetupError(
            f"MergeCallback: {type(root).__name__} has no parameters or buffers yet, so nothing can take the "
            f"merge of {expert.label}; build the model in __init__ or in configure_model() (under "
            "ModelParallelStrategy the merge waits for configure_model()).")
    if best == 0:
        sample = [f"'{n}'" for n, _, _ in candidates[:6]]
        raise MergeSetupError(
            f"MergeCallback: no submodule of {type(root).__name__} has tensor names matching {expert.label} "
            f"(its names look like {sorted(expert.keys())[:3]}; candidates tried include {', '.join(sample)}). "
            f"Pass target='<dotted path>' of the submodule the experts were saved from.{hint}"
        )
    top = [s for s in scored if s[2] == best]
    # an ancestor matching as many names as its descendant holds the same tensors: keep the deepest
    top = [s for s in top if not any(o[0] != s[0] and (s[0] == "" or o[0].startswith(s[0] + ".")) for o in top)]
    if len(top) > 1:
        listing = ", ".join(f"'{n}' ({h} of {len(expert.keys())} names match)" for n, _, h, _ in top)
        raise MergeSetupError(
            f"MergeCallback: several submodules match {expert.label} equally well: {listing}. "
            "Pass target='<dotted path>' to choose one."
        )
    name, module, hits, _ = top[0]
    n_exp = len(expert.keys())
    if hits < n_exp:
        rank_zero_warn(f"MergeCallback: only {hits} of the {n_exp} tensor names of {expert.label} match the "
                       f"chosen target '{name}'; the others are not merged. Pass target=... if that is wrong.")
    return name, module


def shards_after_setup(trainer: pl.Trainer) -> bool:
    """True for strategies that build and shard the module after ``setup`` with FSDP2
    (Lightning's ``ModelParallelStrategy``): the merge then runs into the shards, once they exist."""
    return type(trainer.strategy).__name__ == "ModelParallelStrategy"


def check_materialized(trainer: pl.Trainer, name: str, target: nn.Module, sharded_ok: bool = False) -> None:
    """Refuse targets whose tensors cannot be merged into now (naming the strategy): on the meta
    device, FSDP1-wrapped, ZeRO-3 partitioned, or DTensors unless ``sharded_ok`` (the sharded
    route of :mod:`.sharded`, after ``ModelParallelStrategy`` has sharded the module)."""
    strategy = type(trainer.strategy).__name__
    reason = None
    for mod in target.modules():
        if "FullyShardedDataParallel" in type(mod).__name__:
            reason = "already wrapped in FullyShardedDataParallel"
            break
    if reason is None:
        for _, t in itertools.chain(target.named_parameters(), target.named_buffers()):
            if t.is_meta:
                reason = "on the meta device (not materialized: e.g. Trainer.init_module(empty_init=True))"
            elif hasattr(t, "ds_id") or hasattr(t, "ds_numel"):
                reason = "partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init)"
            elif not sharded_ok and is_dtensor(t):
                reason = "sharded DTensors"
            if reason:
                break
    if reason and sharded_ok:
        raise MergeSetupError(
            f"MergeCallback cannot merge into '{name or type(target).__name__}' under {strategy}: its "
            f"parameters are {reason} after the strategy's setup. Materialize them in configure_model() "
            "(e.g. to_empty() then load or initialize the weights) before the merge runs."
        )
    if reason:
        raise MergeSetupError(
            f"MergeCallback cannot merge into '{name or type(target).__name__}' under {strategy}: its "
            f"parameters are {reason} at setup(). Under DDP the merge runs in setup(), before configure_model(); "
            "create the model, materialized, in the LightningModule's __init__, use ModelParallelStrategy "
            "(FSDP2: the merge then runs into the shards after configure_model()), or merge offline with "
            "lightning_merge.merge_models(..., out='merged/') and load that folder in configure_model()."
        )
