"""``LearnedMerge``: merge coefficients trained as a LightningModule (AdaMerging, DAM).

The wrapped model (a Hugging Face folder or any ``nn.Module``) keeps the base weights θ₀ in its
``target`` submodule (frozen, in ``storage_dtype``); an :class:`~lightning_merge.learned.bank.ExpertBank`
holds every expert's task vector δ_m as frozen buffers; the only ``nn.Parameter``\\ s that train are
the merge coefficients (:class:`~lightning_merge.learned.coefficients.Coefficients`). Each step
builds the merged tensors θ*(c) (float32) and runs the model through
``torch.func.functional_call(model, θ*)``, so gradients reach the coefficients only.

Objectives (``objective``):

* ``"entropy"`` (AdaMerging): Σ_tasks mean H(softmax(z)) of the merged model on unlabelled batches
  (``labels`` are dropped);
* ``"dam"`` (spec §8.2): Σ_m dam_kl(z(x_m), z_m(x_m)) over the experts, x_m a batch of expert m's
  task (``expert_tasks``), z_m the logits of θ₀ + δ_m computed with the same functional call (no
  model copy; under no_grad);
* ``"task"``: Σ_tasks the supervised loss of the merged model.

Plus, for every objective: ``similarity_weight`` · Σ_layers mean_{a<b} cos(c_a, c_b) over the
trained column vectors (granularity ``"column"`` only), ``l1_weight`` · Σ‖c_m‖₁ and
``l2_weight`` · Σ‖c_m‖₂. Batches are a plain batch dict or a dict ``{task: batch}``
(:class:`~lightning_merge.learned.data.PerTaskTokensDataModule`); ``dam`` needs the latter.

Memory. Resident: θ₀ (once, the target itself) + the non-zero δ_m, all in ``storage_dtype``, plus
the coefficients and their Adam states (N × tensors, or N × Σ in_features for ``"column"``).
During a step: one float32 merged copy of the target (each merged tensor is built by
:class:`~lightning_merge.learned.combine.Combine`, which keeps only the coefficients for the
backward; autograd keeps each merged weight for the layer's input gradient), and with ``dam``
one transient float32 copy of θ_m per teacher forward. Never N float32 model copies. A Hugging
Face folder is built in ``__init__`` with its parameters on the meta device and read when the
trainer sets the module up (or at first use): whole, or under ``ModelParallelStrategy`` each rank
only the rows of its shards, so no rank holds the whole model (:mod:`.meta`).

DDP: the frozen tensors are excluded from DDP's broadcasts (``_ddp_params_and_buffers_to_ignore``;
every rank reads the same files), the coefficient gradients are averaged, so the coefficients
stay identical on every rank (a model with layers its forward does not use needs
``strategy="ddp_find_unused_parameters_true"``, as for any DDP training). Checkpoints hold only
the coefficients (plus a layout record that is checked on resume); the base and the experts are
read again from their paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..engine import VocabPolicy
from ..errors import ConfigError
from ..lightning.callback import find_target
from ..sources.resolve import open_source
from .bank import ExpertBank
from .coefficients import BiasInit, CoefficientFn, Coefficients, Granularity
from .config import STORAGE_DTYPES, build_model, check_args, check_path, pair_expert_tasks
from .evaluation import MergedValidation
from .meta import Placement, load_weights
from .objectives import (
    KLNormalization,
    dam_kl,
    entropy,
    l1_penalty,
    l2_penalty,
    logits_of,
    model_inputs,
    similarity_penalty,
    split_tasks,
    task_loss,
    token_mask,
)

log = logging.getLogger(__name__)

Objective = Literal["entropy", "dam", "task"]
DTypeName = Literal["float32", "bfloat16", "float16"]

__all__ = ["LearnedMerge"]


class LearnedMerge(MergedValidation, pl.LightningModule):
    """Learn merge coefficients (see the module doc for the math, memory and DDP behaviour).

    Args:
        model: the model to merge into: a Hugging Face folder (loaded with ``model_class``) or an
            ``nn.Module``. Its ``target`` submodule's weights are the base θ₀ unless ``base`` is given.
        experts: the fine-tuned experts: HF folders, .safetensors, .ckpt, PEFT LoRA adapter folders
            (exact dense deltas), or in-memory modules / state dicts.
        base: the base weights, if not the model's own.
        target: dotted path of the submodule the experts' tensor names match (``""`` for the model
            itself); None finds it by key matching, as :class:`~lightning_merge.MergeCallback` does.
        model_class: ``transformers`` class to load a folder with (``"auto"``: from config.json).
        model_kwargs: extra ``from_pretrained`` arguments (e.g. ``{num_labels: 4}``).
        granularity: ``"task"``, ``"tensor"`` (AdaMerging) or ``"column"`` (DAM); see
            :mod:`~lightning_merge.learned.coefficients`.
        coefficient_fn: g applied to the raw coefficients (``identity``, ``tanh``, ``sigmoid``,
            ``relu``, ``softmax`` over the models).
        init: the initial effective coefficient (default 0.3 for task/tensor, 1/M for column).
        clamp: ``[lo, hi]`` applied after g, or None.
        include_base: column granularity: the base is an extra model with its own coefficients.
        bias_init: column granularity: initial bias coefficient: ``"uniform"`` (1/M, default: the merge
            starts as the uniform soup), ``"sum"`` (1.0, the DAM reference's init) or a number.
        merge_embeddings, merge_norms: column granularity: train the embedding / norm coefficients
            (else they stay at 1/M).
        storage_dtype: dtype of θ₀ and the δ_m (arithmetic is float32 regardless).
        objective: ``"entropy"``, ``"dam"`` or ``"task"``.
        temperature, kl_normalization: of the ``dam`` KL (T = 2, ``"reference"`` as the reference code).
        similarity_weight, l1_weight, l2_weight: the regularizers' weights (DAM defaults 0.01, 0, 0).
        expert_tasks: the data task of each expert (``dam``); default: the data module's tasks in order.
        optimizer, lr, weight_decay: Adam (AdaMerging) or AdamW over the coefficients only.
        dropout: keep the wrapped model's dropout active in training (default off: deterministic;
            the wrapped model stays in eval mode, so Lightning warns that modules are in eval mode).
        export_dir: write the merged model there (:meth:`export`) at the end of ``fit``: the whole model
            when it is a Hugging Face model, else its target (``target_only``), e.g. the encoder of a wrapper.
        export_dtype: dtype of the exported weights.
        overwrite: replace an existing ``export_dir``.
        vocab_policy: resized vocabularies of the experts (see :func:`~lightning_merge.merge_models`).
    """

    def __init__(
        self,
        model: str | nn.Module,
        experts: Sequence[Any],
        *,
        base: str | None = None,
        target: str | None = None,
        model_class: str = "auto",
        model_kwargs: dict[str, Any] | None = None,
        granularity: Granularity = "tensor",
        coefficient_fn: CoefficientFn = "identity",
        init: float | None = None,
        clamp: list[float] | None = None,
        include_base: bool = False,
        bias_init: BiasInit = "uniform",
        merge_embeddings: bool = False,
        merge_norms: bool = False,
        storage_dtype: DTypeName = "float32",
        objective: Objective = "entropy",
        temperature: float = 2.0,
        kl_normalization: KLNormalization = "reference",
        similarity_weight: float = 0.01,
        l1_weight: float = 0.0,
        l2_weight: float = 0.0,
        expert_tasks: list[str] | None = None,
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dropout: bool = False,
        export_dir: str | None = None,
        export_dtype: DTypeName = "float32",
        overwrite: bool = False,
        vocab_policy: VocabPolicy = "truncate",
    ) -> None:
        super().__init__()
        args = dict(locals())
        who = type(self).__name__
        check_args(who, args)
        experts = [check_path(who, f"experts[{i}]", e) for i, e in enumerate(experts)]
        if base is not None:
            base = check_path(who, "base", base)
        if isinstance(model, (str, os.PathLike)):
            check_path(who, "model", model)
        if all(isinstance(v, str) for v in [model, *experts, *([base] if base is not None else [])]):
            self.save_hyperparameters()
        self.granularity, self.objective = granularity, objective
        self.temperature, self.kl_normalization = float(temperature), kl_normalization
        self.similarity_weight, self.l1_weight, self.l2_weight = similarity_weight, l1_weight, l2_weight
        self.expert_tasks = list(expert_tasks) if expert_tasks is not None else None
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.dropout = dropout
        self.export_dir, self.export_dtype, self.overwrite = export_dir, STORAGE_DTYPES[export_dtype], overwrite

        self.model, self.model_path = build_model(who, model, model_class, model_kwargs)
        #: the files this merge reads: an export may not be, contain or lie inside any of them
        self.input_paths = [os.fspath(v) for v in [*experts, base, self.model_path]
                            if isinstance(v, (str, os.PathLike))]
        first = open_source(experts[0])
        try:
            self.target_name, target_module = find_target(self.model, first, target)
        finally:
            first.close()
        self.prefix = f"{self.target_name}." if self.target_name else ""
        # laid out and checked now, read when the trainer sets the module up (shard-local when sharded)
        self.bank = ExpertBank.build(target_module, experts, base=base, storage_dtype=STORAGE_DTYPES[storage_dtype],
                                     adopt=True, vocab_policy=vocab_policy, load=False)
        self._sharded, self._placement = False, Placement()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.coefficients = Coefficients(
            self.bank, granularity, fn=coefficient_fn, init=init, clamp=tuple(clamp) if clamp else None,
            include_base=include_base, bias_init=bias_init, merge_embeddings=merge_embeddings, merge_norms=merge_norms)
        if granularity == "column" and not any(s.trainable for s in self.coefficients.slots):
            raise ConfigError(f"{who}: granularity='column' found no nn.Linear / Conv1D layers in target "
                              f"'{self.target_name}' to learn; use granularity='tensor'")
        self.strict_loading = False
        self._val_params: dict[str, Tensor] | None = None
        self._val_sums: dict[str, Tensor] = {}

    # ---- reading the experts: when the trainer sets the module up, or at first use
    def load_bank(self) -> ExpertBank:
        """Read the model (a folder's meta skeleton) and the experts now (once; the trainer does it
        in ``configure_model``)."""
        if not self.bank.loaded:
            load_weights(self.model, self.model_path, self._placement.device)  # a meta-device skeleton (.meta)
            self.bank.load()
            # every rank reads the same files: keep the frozen tensors out of DDP's broadcasts
            self._ddp_params_and_buffers_to_ignore = [
                n for n, _ in self.named_parameters() if not n.startswith("coefficients.")] + [
                n for n, _ in self.named_buffers()]
            footprint = self.bank.nbytes()
            log.info("%s: %d experts, %d tensors in '%s', %d coefficients; resident base %.1f MB, deltas %.1f MB",
                     type(self).__name__, self.bank.n_experts, len(self.bank.names), self.target_name or "<model>",
                     sum(p.numel() for p in self.coefficients.parameters()), footprint["base"] / 2**20,
                     footprint["deltas"] / 2**20)
        return self.bank

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard the model (FSDP2) and read the experts shard-local
        (see :mod:`.sharded`); otherwise read them."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not self._sharded:
            if self.bank.loaded:
                raise ConfigError("LearnedMerge: the experts were already read unsharded (the module was used "
                                  "before this ModelParallelStrategy run); build a new LearnedMerge for it")
            from .sharded import shard_model

            shard_model(self, mesh)
            self._sharded = True
        elif mesh is None:
            self.load_bank()

    # ---- the merged model
    def merged_params(self) -> dict[str, Tensor]:
        """θ*(c) of every target tensor, keyed by the model's names (float32, differentiable in c).
        Sharded: θ*(c) is written into the shards instead and ``{}`` returned (see :mod:`.sharded`)."""
        if self._sharded:
            from .sharded import write_merged

            write_merged(self)
            return {}
        return {self.prefix + n: t for n, t in self.coefficients.merged_params(self.load_bank()).items()}

    @torch.no_grad()
    def expert_params(self, m: int) -> dict[str, Tensor]:
        """θ₀ + δ_m of every target tensor (float32, no grad): expert m as the same model.
        Sharded: written into the shards, ``{}`` returned."""
        if self._sharded:
            from .sharded import write_expert

            write_expert(self, m)
            return {}
        return {self.prefix + n: t for n, t in self.load_bank().expert_params(m).items()}

    def call(self, params: Mapping[str, Tensor], inputs: Mapping[str, Any]) -> Any:
        """Run the wrapped model with ``params`` in place of its target's tensors (sharded: with the
        weights last written into its shards)."""
        if self._sharded:
            return self.model(**dict(inputs))
        return functional_call(self.model, dict(params), args=(), kwargs=dict(inputs), tie_weights=True, strict=False)

    def forward(self, **inputs: Any) -> Any:
        """The merged model's output for HF-style keyword inputs."""
        return self.call(self.merged_params(), inputs)

    def _apply(self, fn: Any, recurse: bool = True) -> LearnedMerge:
        return super()._apply(self._placement.wrap(fn), recurse)  # a skeleton stays on meta until read (.meta)

    def train(self, mode: bool = True) -> LearnedMerge:
        super().train(mode)
        if not self.dropout:
            self.model.eval()  # only the coefficients learn: no dropout noise unless asked for
        return self

    # ---- data
    def setup(self, stage: str) -> None:
        if self.objective == "dam" and stage == "fit":
            dm = getattr(self.trainer, "datamodule", None)
            names = getattr(dm, "train_tasks", None) or getattr(dm, "task_names", None)
            self.expert_tasks = pair_expert_tasks(self.expert_tasks, names, self.bank.n_experts)

    # ---- objectives
    def objective_loss(self, batch: Any) -> Tensor:
        """The objective of one batch (without the regularizers)."""
        tasks = split_tasks(batch)
        terms: list[Tensor] = []
        if self.objective == "dam":
            expert_tasks = self.expert_tasks or list(tasks)[: self.bank.n_experts]
            missing = [t for t in expert_tasks if t not in tasks]
            if missing or len(expert_tasks) < self.bank.n_experts:
                raise ConfigError(f"LearnedMerge: objective='dam' needs a batch of each expert's task {expert_tasks}; "
                                  f"the batch has {list(tasks)} (use a per-task data module, e.g. "
                                  "PerTaskTokensDataModule, and set expert_tasks)")
            batches = [model_inputs(tasks[task], labels=False) for task in expert_tasks]
            teachers: list[Tensor | None] = [None] * len(batches)
            if self._sharded:  # every teacher before the merged weights go back in for the students
                with torch.no_grad():
                    teachers = [logits_of(self.call(self.expert_params(m), b)) for m, b in enumerate(batches)]
            params = self.merged_params()
            for m, inputs in enumerate(batches):
                z = logits_of(self.call(params, inputs))
                z_m = teachers[m]
                if z_m is None:
                    with torch.no_grad():
                        z_m = logits_of(self.call(self.expert_params(m), inputs))
                terms.append(dam_kl(z, z_m, token_mask(z, inputs), temperature=self.temperature,
                                    normalization=self.kl_normalization))
        else:
            params = self.merged_params()
            for b in tasks.values():
                inputs = model_inputs(b, labels=self.objective == "task")
                out = self.call(params, inputs)
                if self.objective == "task":
                    terms.append(task_loss(out, inputs))
                else:
                    z = logits_of(out)
                    terms.append(entropy(z, token_mask(z, inputs)))
        return torch.stack(terms).sum()

    def regularization(self) -> Tensor | None:
        """similarity + L1 + L2 terms (None when all are off)."""
        c = self.coefficients
        terms = []
        if self.similarity_weight and c.granularity == "column":
            sim = similarity_penalty(v for _, v in c.trainable_vectors())
            if sim is not None:
                terms.append(self.similarity_weight * sim)
        trained = [c.activate(p) for p in c.values.values()]
        if self.l1_weight and (t := l1_penalty(trained)) is not None:
            terms.append(self.l1_weight * t)
        if self.l2_weight and (t := l2_penalty(trained)) is not None:
            terms.append(self.l2_weight * t)
        return torch.stack(terms).sum() if terms else None

    def on_after_backward(self) -> None:
        if self._sharded:
            from .sharded import pull_back

            pull_back(self)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        obj = self.objective_loss(batch)
        reg = self.regularization()
        loss = obj if reg is None else obj + reg
        size = sum(len(next(iter(b.values()))) for b in split_tasks(batch).values())
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"train/{self.objective}", obj, batch_size=size)
        return loss

    # ---- optimization, checkpoints, export
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.coefficients.parameters())
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def layout(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "tensors": list(self.bank.names),
                "experts": self.bank.n_experts, "models": self.coefficients.n_models}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if not k.startswith("coefficients.") and not self._sharded]:
            del sd[k]  # the base and the experts are read again from their paths (sharded: see .sharded)
        checkpoint["learned_merge"] = self.layout()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("learned_merge")
        if saved is not None and saved != self.layout():
            diff = [k for k in saved if saved.get(k) != self.layout().get(k)]
            raise ConfigError(f"LearnedMerge: the checkpoint was made with another merge layout (differs in {diff}); "
                              "resume with the same model, experts and granularity")
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):
            for k, v in self.state_dict().items():  # the frozen tensors were left out on save: keep ours
                sd.setdefault(k, v)

    def on_train_end(self) -> None:
        if self.export_dir is None:
            return
        if self.trainer.is_global_zero or self._sharded:  # sharded: every rank gathers, rank 0 writes
            hf = hasattr(self.model, "config") and hasattr(self.model, "save_pretrained")
            self.export(self.export_dir, overwrite=self.overwrite, target_only=not hf)  # a loadable model
        self.trainer.strategy.barrier("learned_merge_export")

    def export(self, path: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
               overwrite: bool = False, coefficients: bool = True, plot: bool = True,
               target_only: bool = False) -> dict[str, Tensor] | Path:
        """The merged model as a plain model: a state dict (``path=None``) or an HF folder written
        atomically, with the learned coefficients and a plot of them by layer in its subfolder
        ``learned_coefficients/`` (:mod:`.export`). ``target_only``: only the merged
        target submodule (names relative to it), e.g. an encoder without its task heads. See
        :mod:`.export`."""
        from .export import export_model

        return export_model(self, path, dtype=dtype or self.export_dtype, overwrite=overwrite,
                            coefficients=coefficients, plot=plot, target_only=target_only)
