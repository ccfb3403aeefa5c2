"""``MergeCallback``: merge experts into a LightningModule when a Trainer call starts.

When it runs. Lightning 2.6 ``Trainer._run`` calls, in this order: callback and module ``setup``
-> ``configure_model`` -> restore the module and the callbacks from ``ckpt_path`` (after the
strategy's setup instead when ``strategy.restore_checkpoint_after_setup``: FSDP, DeepSpeed,
ModelParallel) -> ``strategy.setup`` (moves and wraps the model) -> ``on_fit_start``. Under DDP
and one device the merge runs in :meth:`MergeCallback.setup`, on the unwrapped module, so weights
restored from a checkpoint always replace merged weights (restoring comes later) and DDP wraps an
already merged model. Under ``ModelParallelStrategy`` (FSDP2) the module is built and sharded in
``configure_model`` / ``strategy.setup``, so the merge waits for the first hook after them
(``on_fit_start``, or ``on_validation_start`` / ``on_test_start`` / ``on_predict_start``) and goes
into the shards (:mod:`.sharded`: no rank holds the whole model); a checkpoint holding this merge
(a file, or a distributed checkpoint folder's ``meta.pt``) skips it, and its weights are restored
next. FSDP1 and DeepSpeed modules, and modules still on the meta device when the merge runs, are
refused with :class:`MergeSetupError`. A callback that merged one module and is given another
merges the new one (with a message); the same module is never merged twice.

Resume. The checkpoint path of the running call is a local variable of ``Trainer._run`` at
``setup`` time: ``trainer.ckpt_path`` is only set later (``_CheckpointConnector.resume_start``),
so until then it holds the previous call's path. The callback reads that local from the caller's
frame (read-only; if a Lightning version hides it, the callback merges and the restored weights
still win) and peeks at the checkpoint's ``callbacks`` entry (``torch.load(mmap=True,
weights_only=True)``, no tensor data read). A checkpoint holding this callback's state with
``merged=True`` and the same configuration hash skips the merge (:mod:`.resume`).

Target. :func:`.targeting.find_target` picks the submodule whose tensor names match the experts';
:func:`.targeting.check_materialized` refuses unmaterialized or sharded ones. Diagnostics (changed
entries, sign conflicts, adaptive-RMS / DPPA statistics per block) come from :mod:`.diagnostics`.

Ranks. The plan's tensors are split into ``world_size`` shares balanced by size
(:func:`split_tasks`); each rank merges its share (statistics passes are combined with
``all_gather_object``), then every share is broadcast from its owner in byte buckets, so each rank
ends with the same tensors as a one-process merge with the same seed on the same device type.
Without an initialized ``torch.distributed`` group each rank merges everything (same result).
A failure on one rank is reported on every rank (no rank waits forever in a collective).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..engine import (
    MergePlan,
    TensorTask,
    VocabPolicy,
    build_plan,
    compute_statistics,
    iter_inputs,
    merge_task,
)
from ..errors import ConfigError, MergeError
from ..methods.base import MergeMethod, check_weights
from ..methods.registry import get_method
from ..sources.base import ModuleSource, Source, align
from ..sources.identity import identified
from ..sources.resolve import open_source
from ..targets.module import WeightBackup, find_tensor
from .diagnostics import group_of, method_group_means, sign_conflict
from .ranks import Comm, PeerFailed, buckets, pack, split_tasks, unpack
from .resume import peek_callback_state, pending_ckpt_path
from .sharded import GatheredBase, merge_into_shards
from .targeting import MergeSetupError, check_materialized, find_target, shards_after_setup

log = logging.getLogger(__name__)

Stage = Literal["fit", "validate", "test", "predict"]
STAGES: tuple[str, ...] = ("fit", "validate", "test", "predict")


def _enable_method_class_paths() -> None:
    """Let jsonargparse / LightningCLI take ``method: {class_path: lightning_merge.Ties, init_args: ...}``.

    jsonargparse (>= 4.3x) disables subclass specs for dataclass types by default; this enables them
    for :class:`MergeMethod` only. ``method: ties`` with ``method_params: {...}`` works regardless.
    """
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(subclasses_enabled=[MergeMethod])
    except (ImportError, TypeError, ValueError):  # older jsonargparse: subclass specs already allowed
        pass


_enable_method_class_paths()


# ----------------------------------------------------------------------------------- callback

class MergeCallback(Callback):
    """Merge fine-tuned experts (HF folders, .safetensors, .ckpt, PEFT LoRA adapters) into the
    LightningModule in ``setup`` of the configured stages, once per callback instance.

    Args:
        experts: paths of the experts (checked to exist now, opened at setup).
        method: a :class:`~lightning_merge.methods.base.MergeMethod` (e.g. ``Ties(density=0.2)``)
            or its registered name (``"ties"``, ``"dare_ties"``, ...).
        method_params: hyperparameters for a method given by name (or replacements for a method
            instance), e.g. ``{"density": 0.3, "lambda": 0.9}``.
        weights: one weight per expert (default 1 each).
        base: the pre-trained model the experts were fine-tuned from; None: the module's own
            weights at merge time are the base.
        target: dotted path of the submodule whose tensor names match the experts' (``"model"``
            for ``self.model = AutoModelForCausalLM...``; ``""`` for the module itself). None: the
            submodule matching the first expert's names best; ambiguity or no match is an error.
        seed: global seed; randomness is per (seed, tensor, expert), so the result does not depend
            on the number of ranks (it does on the device type: CPU and CUDA streams differ).
        stages: the Trainer calls whose setup merges (if not merged yet by this instance).
        device: where the arithmetic runs; None: the strategy's CUDA device if it has one, else CPU.
        vocab_policy: resized vocabularies: ``"truncate"``, ``"pad_mean"`` or ``"error"``.
        strict: error on expert tensors the target lacks, instead of skipping them.
        log_diagnostics: compute and log merge statistics (time, entries changed, sign conflicts,
            adaptive-RMS drop rates / DPPA densities per layer) with ``trainer.logger`` at the first
            ``on_{train,validation,test,predict}_start``, on rank zero.
        keep_backup: keep a CPU copy of the target's pre-merge weights for :meth:`restore`.

    After the merge, :attr:`merged` is True, :attr:`diagnostics` holds the statistics and
    :meth:`restore` puts the pre-merge weights back.

    With ``strategy="ddp_spawn"`` the merge runs in the spawned workers and Lightning returns only
    the weights to the launching process: the callback object there still says ``merged=False``,
    so do not reuse it for another Trainer call on the returned (already merged) module; the
    default ``strategy="ddp"`` has no such gap.
    """

    def __init__(
        self,
        experts: list[str],
        method: MergeMethod | str = "task_arithmetic",
        *,
        method_params: dict[str, Any] | None = None,
        weights: list[float] | None = None,
        base: str | None = None,
        target: str | None = None,
        seed: int = 0,
        stages: Sequence[Stage] = ("fit", "validate", "test"),
        device: str | None = None,
        vocab_policy: VocabPolicy = "truncate",
        strict: bool = False,
        log_diagnostics: bool = True,
        keep_backup: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(experts, (str, os.PathLike)) or not isinstance(experts, Sequence) or not experts:
            raise ConfigError(f"MergeCallback: experts must be a non-empty list of paths, got {experts!r}")
        self.experts = [self._existing(f"experts[{i}]", e) for i, e in enumerate(experts)]
        self.base = None if base is None else self._existing("base", base)
        self.method = self._build_method(method, method_params)
        n = len(self.experts)
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != n:
                count = len(weights) if isinstance(weights, Sequence) else "not a list of"
                raise ConfigError(f"MergeCallback: weights has {count} values for {n} experts; "
                                  "give one weight per expert")
        try:
            weights = None if weights is None else [float(w) for w in weights]
            check_weights(self.method.name, weights or [1.0] * n, allow_negative=self.method.allow_negative_weights)
        except (TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise ConfigError(f"MergeCallback: weights {weights!r}: {e}") from None
        try:
            self.method.check_experts(n)
        except ConfigError as e:
            raise ConfigError(f"MergeCallback: method: {e}") from None
        self.weights = weights
        if target is not None and not isinstance(target, str):
            raise ConfigError(f"MergeCallback: target must be a dotted submodule path, got {target!r}")
        self.target = target
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"MergeCallback: seed must be an integer, got {seed!r}")
        self.seed = seed
        stages = [stages] if isinstance(stages, str) else list(stages)
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ConfigError(f"MergeCallback: stages {stages!r} must be a non-empty list of {list(STAGES)}")
        self.stages = tuple(dict.fromkeys(stages))
        if device is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"MergeCallback: device '{device}' is not a torch device (e.g. 'cpu', 'cuda')") \
                    from None
        self.device = device
        if vocab_policy not in ("truncate", "pad_mean", "error"):
            raise ConfigError(f"MergeCallback: vocab_policy '{vocab_policy}' is not one of "
                              "['truncate', 'pad_mean', 'error']")
        self.vocab_policy = vocab_policy
        self.strict = bool(strict)
        self.log_diagnostics = bool(log_diagnostics)
        self.keep_backup = bool(keep_backup)
        self.config_hash = self._hash()
        #: statistics of the last merge (empty until then), metric name -> value
        self.diagnostics: dict[str, float] = {}
        #: the dotted path of the submodule merged into (set at setup)
        self.target_name: str | None = None
        self._merged = False
        self._merged_in_setup = False
        self._skipped_for: Any = None
        self._backup: WeightBackup | None = None
        self._pending: dict[str, float] | None = None
        self._module_ref: weakref.ref | None = None  # the module merged into
        self._deferred: str | None = None  # the stage whose merge waits for the strategy to shard

    # ---- configuration
    @staticmethod
    def _existing(arg: str, path: Any) -> str:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"MergeCallback: {arg} must be a path, got {type(path).__name__} {path!r}")
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(
                f"MergeCallback: {arg} = '{path}': no such file or folder. Pass a local Hugging Face model "
                "folder, a PEFT LoRA adapter folder, a .safetensors file or a .ckpt/.pt/.bin checkpoint "
                "(download Hub models first, e.g. huggingface_hub.snapshot_download)"
            )
        return os.fspath(path)

    @staticmethod
    def _build_method(method: MergeMethod | str, params: dict[str, Any] | None) -> MergeMethod:
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(f"MergeCallback: method_params must be a dict, got {params!r}")
        try:
            if isinstance(method, str):
                return get_method(method, **dict(params or {}))
            if isinstance(method, MergeMethod):
                if not params:
                    return method
                p = dict(params)
                if "lambda" in p:
                    p["lambda_"] = p.pop("lambda")
                return method.with_params(**p)
        except ConfigError as e:
            raise ConfigError(f"MergeCallback: method: {e}") from None
        except TypeError as e:
            raise ConfigError(f"MergeCallback: method_params {dict(params or {})}: {e}") from None
        raise ConfigError(f"MergeCallback: method must be a MergeMethod or a method name, got {method!r}")

    def config(self) -> dict[str, Any]:
        """What determines the merged weights (hashed into :attr:`config_hash` and :attr:`state_key`,
        with the expert and base paths replaced by the content identity of their files:
        :func:`~lightning_merge.sources.identity.content_identity`)."""
        return {
            "experts": [os.path.normpath(e) for e in self.experts],
            "base": None if self.base is None else os.path.normpath(self.base),
            "method": self.method.describe(),
            "weights": self.weights,
            "target": self.target,
            "seed": self.seed,
            "vocab_policy": self.vocab_policy,
            "strict": self.strict,
        }

    def _hash(self) -> str:
        text = json.dumps(identified(self.config()), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_hash=self.config_hash)

    @property
    def merged(self) -> bool:
        """True once the merge is applied (or restored from a checkpoint that contains it)."""
        return self._merged

    def state_dict(self) -> dict[str, Any]:
        return {"merged": self._merged, "config_hash": self.config_hash}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        merged, h = bool(state_dict.get("merged", False)), state_dict.get("config_hash")
        if h != self.config_hash:
            rank_zero_warn(
                f"MergeCallback: the checkpoint's merge state has configuration hash {h!r}, this callback's is "
                f"{self.config_hash!r}: the checkpoint was made with another merge configuration. Its weights "
                "are restored and this callback does not merge again on top of them."
            )
        elif self._merged_in_setup and merged:
            log.info("MergeCallback: the checkpoint's weights (this merge, then training) replace the merge "
                     "computed in setup()")
        elif self._merged_in_setup:
            rank_zero_warn("MergeCallback: the checkpoint was saved before this merge ran; its restored weights "
                           "replace the merge computed in setup()")
        self._merged = merged

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or not self._merged_in_setup:
            return
        others = [k for k in states if str(k).startswith(type(self).__qualname__)]
        rank_zero_warn(
            f"MergeCallback (config {self.config_hash}): the checkpoint {trainer.ckpt_path} holds no state of this "
            "merge" + (f" (it holds {others}: another merge configuration)" if others else "")
            + "; its weights were restored over the merge done in setup(), so this merge is not in effect. "
            "Resume with the MergeCallback configuration that made the checkpoint, or load its weights "
            "without ckpt_path to merge into them."
        )
        self._merged = False

    # ---- restore
    def restore(self) -> None:
        """Put the target's pre-merge weights back, in place (optimizers and tied weights stay valid).

        Uses the CPU copy taken at setup (``keep_backup=True``). Call it on every rank (e.g. in a
        hook, or after ``trainer.fit`` returns in the same process); it does not work on a model
        the strategy has sharded (FSDP / DeepSpeed). Afterwards :attr:`merged` is False and a later
        setup of a configured stage merges again.
        """
        if self._backup is None:
            raise MergeError("MergeCallback.restore(): no pre-merge weights are kept: the callback has not "
                             "merged yet, or was built with keep_backup=False")
        self._backup.restore()
        self._merged = False

    # ---- the merge
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages:
            return
        if self._merged:
            merged_into = self._module_ref() if self._module_ref is not None else None
            if merged_into is None or merged_into is pl_module:
                log.debug("MergeCallback: already merged; %s does not merge again", stage)
                return
            rank_zero_info(f"MergeCallback: merged into another {type(merged_into).__name__} before; this "
                           f"{type(pl_module).__name__} is a new module, so the experts are merged into it")
            self._merged, self._backup = False, None
        if shards_after_setup(trainer):
            self._deferred = stage  # merged once the strategy has sharded the module (on_*_start)
            return
        self._merge(trainer, pl_module, sharded=False)

    def _merge_deferred(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred is not None and not self._merged:
            self._deferred = None
            self._merge(trainer, pl_module, sharded=True)

    def _merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sharded: bool) -> None:
        found, ckpt = pending_ckpt_path(trainer)
        state = None
        if ckpt:
            state = peek_callback_state(ckpt, self.state_key) if trainer.is_global_zero else None
            state = trainer.strategy.broadcast(state, src=0)
        elif not found:
            log.debug("MergeCallback: the checkpoint path of this Trainer call is unknown; merging")
        skip = bool(state and state.get("merged") and state.get("config_hash") == self.config_hash)
        comm = Comm(trainer)
        sources: list[Source] = []
        t0 = time.perf_counter()
        parts: list[dict[str, list[int]]] = []
        try:
            experts = [open_source(e) for e in self.experts]
            sources.extend(experts)
            self.target_name, target = find_target(pl_module, experts[0], self.target)
            check_materialized(trainer, self.target_name, target, sharded_ok=sharded)
            if self.keep_backup:
                self._backup = WeightBackup(target, ModuleSource(target).keys())
            if skip:
                self._merged, self._skipped_for = True, ckpt
                self._module_ref = weakref.ref(pl_module)
                if trainer.is_global_zero:
                    log.info("MergeCallback: not merging: %s already holds this merge (config %s); its weights "
                             "are restored next", ckpt, self.config_hash)
                return
            plan, tasks, gathered = self._plan(trainer, target, experts, sources, sharded)
            if sharded:
                merge_into_shards(plan, tasks, target, comm, gathered)
                shares: list[list[TensorTask]] = []
                results: dict[str, Tensor] = {}
            else:
                shares = split_tasks(tasks, comm.world)
                mine = shares[comm.rank]
                if plan.method.statistics_passes > 0:
                    compute_statistics(plan, names=[t.name for t in mine], gather=comm.gather if comm.on else None)
                results, counts = self._merge_share(plan, mine, target)
                parts = comm.gather(counts)
        except PeerFailed as e:
            raise MergeError(f"MergeCallback: the merge failed on rank {e.failed.rank}: {e.failed.message}") from None
        except Exception as e:
            if comm.on and not skip and not sharded:
                comm.fail(f"{type(e).__name__}: {e}")
            raise
        finally:
            for s in sources:
                s.close()
        if not sharded:
            self._write_all(comm, target, shares, results)
        self._merged = self._merged_in_setup = True
        self._module_ref = weakref.ref(pl_module)
        self._diagnose(plan, tasks, parts, comm.world, time.perf_counter() - t0, trainer)

    def _plan(self, trainer: pl.Trainer, target: nn.Module, experts: list[Source], sources: list[Source],
              sharded: bool = False) -> tuple[MergePlan, list[TensorTask], GatheredBase | None]:
        module_keys = ModuleSource(target).keys()
        gathered = None
        label = f"<{self.target_name or type(target).__name__} before the merge>"
        if self.base is None and sharded:
            gathered = GatheredBase(target, label)
            base: Source = gathered
        elif self.base is None:
            base = ModuleSource(target, label=label)
        else:
            opened = open_source(self.base)
            sources.append(opened)
            base = align(opened, module_keys)
        root = trainer.strategy.root_device
        device = self.device or (root if root.type == "cuda" else "cpu")
        plan = build_plan(base, experts, self.method, weights=self.weights, seed=self.seed, device=device,
                          vocab_policy=self.vocab_policy, strict=self.strict)
        tasks, absent = [], []
        for task in plan.tasks:
            t = find_tensor(target, task.name)
            if t is None:
                absent.append(task.name)
                continue
            if tuple(t.shape) != tuple(task.shape):
                raise MergeSetupError(
                    f"MergeCallback: merged tensor '{task.name}' has shape {list(task.shape)} but "
                    f"'{self.target_name}' has {list(t.shape)}"
                    + (" (vocab_policy='pad_mean' grows the vocabulary: resize the module's embeddings first)"
                       if task.pad_rows is not None else "")
                )
            tasks.append(task)
        if absent:
            if self.strict:
                raise MergeSetupError(f"MergeCallback: '{self.target_name}' has no tensors named {absent[:5]} "
                                      "(strict=True)")
            if trainer.is_global_zero:
                log.warning("MergeCallback: %d tensors have no counterpart in '%s' and are not merged, e.g. %s",
                            len(absent), self.target_name, absent[:3])
        return plan, tasks, gathered

    def _merge_share(self, plan: MergePlan, tasks: list[TensorTask],
                     target: nn.Module) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """Merge ``tasks`` (reading the next tensor while merging the current one, as run_plan does).

        Returns the merged tensors and, per diagnostics group, [entries changed, floating entries,
        sign conflicts, entries sampled]; "changed" compares with the module's tensors, which still
        hold the pre-merge values (nothing is written before every rank has merged its share).
        """
        results: dict[str, Tensor] = {}
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])

        for task, inputs in iter_inputs(plan, tasks):
            acc = counts[group_of(task.name)]
            if self.log_diagnostics and inputs is not None:
                sc = sign_conflict(inputs, plan.method.space)  # before the method consumes its inputs
                if sc is not None:
                    acc[2] += sc[0]
                    acc[3] += sc[1]
            merged = results[task.name] = merge_task(plan, task, inputs)
            del inputs
            if self.log_diagnostics and merged.is_floating_point():
                current = find_tensor(target, task.name)
                acc[0] += int((current != merged.to(current.device, current.dtype)).sum())
                acc[1] += merged.numel()
        return results, dict(counts)

    @staticmethod
    @torch.no_grad()
    def _write(target: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        for name, value in tensors.items():
            t = find_tensor(target, name)
            assert t is not None  # checked in _plan
            t.copy_(value.to(t.device, t.dtype))

    def _write_all(self, comm: Comm, target: nn.Module, shares: list[list[TensorTask]],
                   results: dict[str, Tensor]) -> None:
        """Write every share into the module: local results directly, the others' as broadcast."""
        if not comm.on:
            self._write(target, results)
            return
        for owner, share in enumerate(shares):
            for bucket in buckets(share):
                if owner == comm.rank:
                    comm.broadcast(pack(bucket, results), bucket[1], src=owner)
                    self._write(target, {t.name: results.pop(t.name) for t, _, _ in bucket[0]})
                else:
                    self._write(target, unpack(bucket, comm.broadcast(None, bucket[1], src=owner)))

    # ---- diagnostics
    def _diagnose(self, plan: MergePlan, tasks: list[TensorTask], parts: list[dict[str, list[int]]],
                  world: int, seconds: float, trainer: pl.Trainer) -> None:
        m: dict[str, float] = {"time_s": seconds, "tensors": float(len(tasks)), "world_size": float(world)}
        if self.log_diagnostics:
            totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
            for part in parts:
                for g, counts in part.items():
                    totals[g] = [a + b for a, b in zip(totals[g], counts)]
            groups: dict[str, dict[str, float]] = defaultdict(dict)
            for g, (changed, n, conflict, sampled) in totals.items():
                if n:
                    groups[g]["changed"] = changed / n
                if sampled:
                    groups[g]["sign_conflict"] = conflict / sampled
            overall = [sum(v[i] for v in totals.values()) for i in range(4)]
            if overall[1]:  # not counted when merging into shards
                m["changed"] = overall[0] / overall[1]
            if overall[3]:
                m["sign_conflict"] = overall[2] / overall[3]
            for g, vals in method_group_means(plan).items():
                groups[g].update(vals)
            for g in sorted(groups):
                for k, v in groups[g].items():
                    m[f"{g}/{k}"] = v
            self._pending = m
        self.diagnostics = m
        if trainer.is_global_zero:
            extra = (f", {100 * m['changed']:.1f}% of entries changed"
                     + (f", sign conflicts {100 * m['sign_conflict']:.1f}%" if "sign_conflict" in m else "")
                     ) if "changed" in m else ""
            log.info("MergeCallback: merged %d experts into '%s' with %s: %d tensors on %d rank(s) in %.2f s%s",
                     len(self.experts), self.target_name, plan.method.name, len(tasks), world, seconds, extra)

    def _log_pending(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        metrics, self._pending = self._pending, None
        if not trainer.is_global_zero or not trainer.loggers:
            return
        several = sum(isinstance(cb, MergeCallback) for cb in trainer.callbacks) > 1
        prefix = f"merge_{self.config_hash[:8]}" if several else "merge"
        metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    # a sharding strategy (ModelParallelStrategy) builds and shards the module after setup(): the
    # merge runs in the first hook after strategy.setup, for the stage that setup() deferred
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge_deferred(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_pending(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge_deferred(trainer, pl_module)
        self._log_pending(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge_deferred(trainer, pl_module)
        self._log_pending(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge_deferred(trainer, pl_module)
        self._log_pending(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._merged_in_setup = False
        self._deferred = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experts={self.experts}, method={self.method.name}, "
                f"config_hash={self.config_hash!r}, merged={self._merged})")
