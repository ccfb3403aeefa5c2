"""The streaming merge engine: plan, statistics passes, then one tensor at a time.

Peak extra memory is about (T + 2) float32 copies of the largest tensor (base, T expert tensors,
the result), never T copies of the model. The next tensor is read on a background thread while
the current one is merged. Every check that can fail on the inputs' *layout* (missing files,
names, shapes, hyperparameters, weights) runs in :func:`build_plan`, before any output exists;
NaN/Inf in a tensor's values is found when that tensor is read, and targets discard their partial
output then (see :mod:`lightning_merge.targets`).

Randomness is per (seed, tensor name, expert), so the result of a tensor does not depend on the
order of tensors, on which subset of names a worker runs (``names=``) or on the worker count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import ConfigError, IncompatibleTensorError
from .methods.base import MergeMethod, TensorInputs, check_weights
from .methods.kernels import all_finite
from .naming import is_vocab_tensor, tensor_groups, tied_head_alias
from .sources.base import Source, align
from .spaces import Space

log = logging.getLogger(__name__)

VocabPolicy = Literal["truncate", "pad_mean", "error"]
TensorParams = Callable[[str], dict[str, Any]]


@dataclass
class TensorTask:
    """What to do for one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    #: expert index -> key in that expert's (aligned) source
    experts: list[int]
    #: "merge", or "copy" (non-float or taken unchanged from ``copy_source``)
    action: Literal["merge", "copy"] = "merge"
    copy_source: int | None = None  # None: the base; i: expert i
    #: expert index -> rows/cols to keep (vocabulary truncation)
    truncate: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: rows every model is padded to with the mean of its own rows (vocab_policy="pad_mean")
    pad_rows: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    """Every tensor's task, and how the inputs are read: ``space`` ("delta": δ = θ − θ₀ for every
    full-weight source, "weight": θ₀ + δ for every delta source) is the method's, or given for a
    plan that only loads (``method`` None: the search cache, the learned merges' bank)."""

    base: Source | None
    experts: list[Source]
    method: MergeMethod | None
    weights: list[float]
    tasks: list[TensorTask]
    space: Space = "delta"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensor_params: TensorParams | None = None
    check_finite: bool = True
    stats: Any = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TensorTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def tied_aliases(base: Source) -> dict[str, str]:
    """Names the base ties to another tensor (``alias -> kept name``).

    From the source itself (a module's shared parameters) or, for HF folders, from
    ``tie_word_embeddings`` in config.json when the checkpoint stores the embedding only.
    """
    aliases = dict(getattr(base, "aliases", {}) or {})
    cfg_dir = getattr(base, "config_dir", None)
    if cfg_dir:
        cfg = Path(cfg_dir) / "config.json"
        try:
            config = json.loads(cfg.read_text()) if cfg.exists() else {}
        except (OSError, ValueError):
            config = {}
        if config.get("tie_word_embeddings", False):
            aliases.update(tied_head_alias(base.keys()))
    return aliases


#: config.json fields that must agree between the base and a full-model expert
ARCHITECTURE_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "d_model")


def _config(src: Source) -> dict | None:
    cfg_dir = getattr(src, "config_dir", None)
    if not cfg_dir:
        return None
    path = Path(cfg_dir) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def check_same_architecture(base: Source, expert: Source) -> None:
    """Refuse an expert whose config.json describes another architecture than the base's.

    Compares :data:`ARCHITECTURE_FIELDS` where both folders have a config (the vocabulary size may
    differ: see ``vocab_policy``). Tensor shapes are checked separately, for every source.
    """
    a, b = _config(base), _config(expert)
    if not a or not b:
        return
    diff = {k: (a[k], b[k]) for k in ARCHITECTURE_FIELDS if k in a and k in b and a[k] != b[k]}
    if diff:
        detail = ", ".join(f"{k}: base {x!r} vs expert {y!r}" for k, (x, y) in diff.items())
        raise IncompatibleTensorError(
            f"{expert.label}: its config.json describes another architecture than the base "
            f"{base.label} ({detail}); experts must be fine-tunes of the base model"
        )


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """Append rows equal to the mean of ``t``'s rows up to ``rows`` (MergeLM's new-token init)."""
    if t.shape[0] >= rows:
        return t
    fill = t.mean(0, keepdim=True).expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, fill], 0)


def build_plan(
    base: Source | None,
    experts: Sequence[Source],
    method: MergeMethod | None,
    *,
    space: Space | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
    vocab_policy: VocabPolicy = "truncate",
    strict: bool = False,
    tensor_params: TensorParams | None = None,
    check_finite: bool = True,
) -> MergePlan:
    """Validate the inputs against each other and decide what happens to every tensor.

    Raises :class:`ConfigError` / :class:`SourceError` / :class:`IncompatibleTensorError` naming the
    file, tensor or parameter at fault. Reads only names, shapes and dtypes, never tensor data.
    ``method=None`` plans loading only, in ``space`` (``load_inputs``; nothing is merged).
    """
    if method is None and space not in ("delta", "weight"):
        raise ConfigError("build_plan: a plan without a method needs space='delta' or 'weight'")
    if not experts:
        raise ConfigError("no experts given: pass at least one fine-tuned model or adapter")
    n = len(experts)
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"weights has {len(weights)} values for {n} experts; give one weight per expert")
    if method is not None:
        check_weights(method.name, weights, allow_negative=method.allow_negative_weights)
        method.check_experts(n)
    if vocab_policy not in ("truncate", "pad_mean", "error"):
        raise ConfigError(f"vocab_policy '{vocab_policy}' is not one of ['truncate', 'pad_mean', 'error']")
    if base is None:
        if method is None and space == "delta" or method is not None and method.requires_base:
            what = f"merge method '{method.name}'" if method is not None else "reading task vectors"
            raise ConfigError(f"{what} needs a base model; pass base=...")
        if any(e.space == "delta" for e in experts):
            bad = [e.label for e in experts if e.space == "delta"]
            raise ConfigError(f"adapters {bad} hold deltas only; pass the base model they were trained on")

    ref_keys = base.keys() if base is not None else experts[0].keys()
    aligned = [align(e, ref_keys) for e in experts]
    if base is not None:
        for e in aligned:
            e.validate_against(base)
            check_same_architecture(base, e)

    expert_keys = [set(e.keys()) for e in aligned]
    base_keys = set(base.keys()) if base is not None else set()
    names: list[str] = list(ref_keys)
    seen = set(names)
    tied = tied_aliases(base) if base is not None else {}
    for e in aligned:
        dropped = [k for k in e.keys() if k in tied and k not in seen]
        if dropped:
            log.info("%s: %s are tied to %s in the base and merged once", e.label, dropped,
                     [tied[k] for k in dropped])
        extra = [k for k in e.keys() if k not in seen and k not in tied]
        if extra and base is not None:
            if strict:
                raise IncompatibleTensorError(
                    f"{e.label}: has tensors the base lacks, e.g. {extra[:3]}; "
                    "use strict=False to copy them from the first model that has them"
                )
            log.warning("%s: %d tensors missing from the base (e.g. %s) are copied unchanged",
                        e.label, len(extra), extra[:3])
        names.extend(extra)
        seen.update(extra)

    tasks: list[TensorTask] = []
    for name in names:
        in_base = name in base_keys
        present = [i for i in range(n) if name in expert_keys[i]]
        ref_src = base if in_base else aligned[present[0]]
        shape = tuple(ref_src.shape(name))
        dtype = ref_src.dtype(name)
        task = TensorTask(name, shape, out_dtype if (out_dtype and dtype.is_floating_point) else dtype, [])
        if not in_base and base is not None:
            task.action, task.copy_source = "copy", present[0]
            tasks.append(task)
            continue
        if not dtype.is_floating_point:
            task.action = "copy"
            tasks.append(task)
            continue
        if vocab_policy == "pad_mean" and is_vocab_tensor(name):
            rows = max([shape[0]] + [aligned[i].shape(name)[0] for i in present])
            if rows != shape[0]:
                task.pad_rows = rows
        for i in present:
            eshape = tuple(aligned[i].shape(name))
            padded = task.pad_rows is not None and eshape[1:] == shape[1:]
            if eshape != shape and not padded:
                if (
                    vocab_policy == "truncate" and is_vocab_tensor(name) and len(eshape) == len(shape)
                    and all(a >= b for a, b in zip(eshape, shape))
                ):
                    task.truncate[i] = shape
                    log.info("%s: '%s' %s truncated to the base's %s (vocab_policy='truncate')",
                             aligned[i].label, name, eshape, shape)
                else:
                    raise IncompatibleTensorError(
                        f"{aligned[i].label}: tensor '{name}' has shape {list(eshape)} but the base has "
                        f"{list(shape)}; experts must share the base's architecture"
                        + (" (for a resized vocabulary use vocab_policy='truncate' or 'pad_mean')"
                           if is_vocab_tensor(name) else "")
                    )
            task.experts.append(i)
        if task.pad_rows is not None:
            log.info("'%s': every model padded to %d rows with the mean of its rows (vocab_policy='pad_mean')",
                     name, task.pad_rows)
            task.shape = (task.pad_rows, *shape[1:])
        tasks.append(task)
    if base is not None:
        _warn_missing(base, aligned, tasks)

    return MergePlan(
        base=base, experts=aligned, method=method, weights=weights, tasks=tasks, space=space or method.space,
        seed=seed, device=torch.device(device), tensor_params=tensor_params, check_finite=check_finite,
    )


def _warn_missing(base: Source, experts: Sequence[Source], tasks: Sequence[TensorTask]) -> None:
    """One warning per full-model expert that lacks tensors the base has (adapters cover only
    their target modules by design), with the count and the layer groups affected."""
    merged = [t for t in tasks if t.action == "merge"]
    for i, e in enumerate(experts):
        if e.space != "weight":
            continue
        lacking = [t.name for t in merged if i not in t.experts]
        if lacking:
            log.warning("%s: lacks %d of the base's %d merged tensors (%s); those tensors are merged from the "
                        "other experts only, or kept from the base where no expert has them", e.label,
                        len(lacking), len(merged), tensor_groups(lacking))


# ------------------------------------------------------------------------------------------ reading

def _checked(t: Tensor, src: Source, name: str, check: bool) -> Tensor:
    if check and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise IncompatibleTensorError(
            f"{src.label}: tensor '{name}' contains {bad} NaN/Inf values; fix or drop that checkpoint"
        )
    return t


def method_for(plan: MergePlan, name: str) -> tuple[MergeMethod, list[float]]:
    """The method and weights for one tensor, after per-tensor overrides."""
    if plan.method is None:
        raise ConfigError("this plan only loads inputs (no merge method)")
    if plan.tensor_params is None:
        return plan.method, plan.weights
    params = dict(plan.tensor_params(name) or {})
    weights = [float(w) for w in params.pop("weights", plan.weights)]
    return (plan.method.with_params(**params) if params else plan.method), weights


Reader = Callable[[Source, str], Tensor]


@torch.no_grad()  # a merge is never differentiated; sources may hand out parameters that require grad
def load_inputs(plan: MergePlan, task: TensorTask, read: Reader | None = None) -> TensorInputs:
    """Read one tensor from the base and every expert that has it, in the plan's space.

    ``read(source, name)`` replaces ``source.get(name)``: the sharded route reads only a rank's
    rows with it (tasks without vocabulary truncation or padding)."""
    weights = method_for(plan, task.name)[1] if plan.method is not None else plan.weights
    dev = plan.device
    get: Reader = read or (lambda src, name: src.get(name))
    base_t = None
    if plan.base is not None:
        base_t = _checked(get(plan.base, task.name), plan.base, task.name, plan.check_finite)
        base_t = base_t.to(dev, torch.float32)
        if task.pad_rows is not None:
            base_t = _pad_rows(base_t, task.pad_rows)
    tensors: list[Tensor] = []
    for i in task.experts:
        src = plan.experts[i]
        raw = _checked(get(src, task.name), src, task.name, plan.check_finite)
        t = raw[tuple(slice(0, s) for s in task.truncate[i])] if i in task.truncate else raw
        t = t.to(dev, torch.float32)
        if task.pad_rows is not None:
            t = _pad_rows(t, task.pad_rows) if src.space == "weight" else _pad_zero(t, task.pad_rows)
        owned = src.fresh_tensors or t.data_ptr() != raw.data_ptr()
        if plan.space == "delta" and src.space == "weight":
            t = t.sub_(base_t) if owned else t - base_t
        elif plan.space == "weight" and src.space == "delta":
            t = t.add_(base_t) if owned else base_t + t
        elif not owned:
            t = t.clone()  # methods may work in place on their inputs
        tensors.append(t)
    return TensorInputs(
        name=task.name, base=base_t, tensors=tensors, experts=list(task.experts),
        weights=[weights[i] for i in task.experts], seed=plan.seed, n_experts=len(plan.experts),
        stats=plan.stats,
    )


def _pad_zero(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], 0)


def _copy(plan: MergePlan, task: TensorTask) -> Tensor:
    src = plan.base if task.copy_source is None else plan.experts[task.copy_source]
    return src.get(task.name).to("cpu").clone().to(task.out_dtype)


# ----------------------------------------------------------------------------------------- running

Gather = Callable[[Any], list[Any]]
#: read the next tensor while merging the current one unless both have more elements than this
PREFETCH_MAX_OVERLAP = 8 * 1024 * 1024


@torch.no_grad()
def compute_statistics(plan: MergePlan, names: Sequence[str] | None = None, gather: Gather | None = None) -> Any:
    """Run the method's statistics passes over ``names`` (default all) and store them in the plan.

    ``gather`` (distributed use) receives this worker's statistics and returns every worker's.
    """
    method = plan.method
    if method.statistics_passes <= 0:
        return None
    wanted = set(plan.names if names is None else names)
    stats = method.init_statistics()
    for p in range(method.statistics_passes):
        for task in plan.tasks:
            if task.action == "merge" and task.name in wanted and task.experts:
                method.observe(stats, p, load_inputs(plan, task))
        if gather is not None:
            stats = method.combine_statistics(gather(stats), p)
        stats = method.finish_pass(stats, p)
    plan.stats = stats
    return stats


@torch.no_grad()
def merge_task(plan: MergePlan, task: TensorTask, inputs: TensorInputs | None = None, *,
               delta: bool = False) -> Tensor:
    """Merge (or copy) one tensor; returns it on CPU in the output dtype (``delta``: the merged
    task vector θ* − θ₀ in float32, for a merge task)."""
    if task.action == "copy":
        return _copy(plan, task)
    if inputs is None:
        inputs = load_inputs(plan, task)
    method, _ = method_for(plan, task.name)
    out = method.merge_delta(inputs) if delta else method.merge(inputs)
    if not all_finite(out):
        raise IncompatibleTensorError(
            f"merged tensor '{task.name}' is not finite with method {method.describe()}; "
            "check the hyperparameters (e.g. a zero weight sum)"
        )
    return out.to("cpu") if delta else out.to(task.out_dtype).to("cpu")


def iter_inputs(plan: MergePlan, tasks: Sequence[TensorTask]) -> Iterator[tuple[TensorTask, TensorInputs | None]]:
    """Yield every task with its inputs (None for a copy), reading the next task's tensors on a
    background thread while the caller works on the current ones; two tasks that both have more
    than :data:`PREFETCH_MAX_OVERLAP` elements are never held at once (memory)."""

    def read(task: TensorTask) -> TensorInputs | None:
        return None if task.action == "copy" else load_inputs(plan, task)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm-read") as pool:
        future = pool.submit(read, tasks[0]) if tasks else None
        for k, task in enumerate(tasks):
            inputs = future.result() if future is not None else read(task)
            nxt = tasks[k + 1] if k + 1 < len(tasks) else None
            overlap = nxt is not None and min(task.numel, nxt.numel) <= PREFETCH_MAX_OVERLAP
            future = pool.submit(read, nxt) if overlap else None
            yield task, inputs
            del inputs


def run_plan(
    plan: MergePlan,
    names: Sequence[str] | None = None,
    *,
    progress: bool | None = None,
    delta: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, merged tensor)`` for ``names`` (default: all), reading ahead one tensor.

    ``delta=True`` yields the merged task vectors θ* − θ₀ (float32) of the merged tensors only (no
    copied ones), as a PEFT adapter stores them. Statistics passes run first when the method has
    them and they were not computed yet. ``progress=None`` shows a bar only on an interactive
    terminal for merges of over 1e8 values.
    """
    if plan.method.statistics_passes > 0 and plan.stats is None:
        compute_statistics(plan)
    wanted = None if names is None else set(names)
    tasks = [t for t in plan.tasks if (wanted is None or t.name in wanted) and not (delta and t.action == "copy")]
    total = sum(t.numel for t in tasks)
    bar = None
    if progress or (progress is None and total > 1e8):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"merge {plan.method.name}", unit="tensor",
                   disable=None if progress is None else not progress)

    for task, inputs in iter_inputs(plan, tasks):
        yield task.name, merge_task(plan, task, inputs, delta=delta)
        del inputs
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
