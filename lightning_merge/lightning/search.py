"""``MergeSearch``: pick the best of several merges on the module's own validation loop, then use it.

When. ``trainer.fit``: at ``on_fit_start`` (after the strategy has set up the model, before the
sanity check and the first training step); training then continues from the chosen merge in the
same fit. ``trainer.validate``: at ``on_validation_start`` of the real validation run, which then
evaluates the chosen merge (its returned and logged metrics are the chosen merge's). ``test`` and
``predict`` do not search (a search ranks merges on the *validation* data): they need a module
that a search already went through, in this process (a ``fit`` / ``validate`` with the same
callback) or from a checkpoint (``ckpt_path``); otherwise :class:`MergeError` is raised at
``on_test_start`` / ``on_predict_start``, before any batch (the checkpoint is restored after
``setup``, so that is the first hook that knows).

How, once per search:

1. every expert (and ``base=`` when given) is read **once** into memory
   (:mod:`~lightning_merge.lightning.search_cache`): as float32 task vectors δ = expert − base
   when any candidate is a delta-space method, else as weights; on the CPU or, with
   ``cache_device="module"``, on the target's device (where the candidates are then merged). The
   base is the target's own weights at the start of the search unless ``base=`` is given. No
   checkpoint is opened again during the search;
2. for each candidate: build a plan on the cached sources, merge, copy the result into the target
   in place, run one validation epoch on a private copy of the Trainer's evaluation loop
   (:mod:`~lightning_merge.lightning.search_loop`: the real loop, the loggers and the other
   callbacks never see it), read the score from ``trainer.callback_metrics``, put the base back;
3. merge the best candidate into the target (ties: the earliest; NaN scores never win).

Candidates (:class:`MergeSearch`): an explicit list (``candidates=``) or a cartesian ``grid=``,
plus ``num_samples`` random draws from a ``space=``
(:mod:`~lightning_merge.lightning.search_space`), evaluated in that order. The DPPA
amplification-factor coordinate search is :class:`~lightning_merge.lightning.search_alpha.DPPAAlphaSearch`.

Logging (rank zero only): one ``log_metrics`` call per candidate with ``step`` = candidate index
(``merge_search/<score>``, ``merge_search/candidate``), and a CSV (default
``trainer.log_dir/merge_search.csv``; columns in :func:`~lightning_merge.lightning.search_log.write_csv`).

Resume: :meth:`state_dict` holds ``searched``, ``best``, the scores and a configuration hash; a
call restored from a checkpoint holding that state does not search again (the checkpoint's weights
are restored before the search would run). A second call with the same callback instance does not
search again either.

Ranks: every rank evaluates the same candidates (merges are deterministic per seed and do not
depend on the rank); the score is the one Lightning reduces across ranks when the module logs
with ``sync_dist`` / torchmetrics. Under ``ModelParallelStrategy`` (FSDP2) each rank caches and
merges only its share of the tensors and receives its shards of the others'
(:func:`~.search_cache.cache_sharded_inputs`); FSDP1 and DeepSpeed are refused at ``setup``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..engine import MergePlan, build_plan, compute_statistics, run_plan
from ..errors import ConfigError, MergeError
from ..methods.base import MergeMethod, check_weights
from ..methods.registry import get_method
from ..sources.base import Source
from ..sources.identity import identified
from ..sources.resolve import open_source
from ..spaces import Space
from ..targets.module import find_tensor, is_sharded, load_into_module
from .ranks import Comm
from .search_cache import SearchInputs, cache_inputs, cache_sharded_inputs, module_device
from .search_log import log_rows, write_csv
from .search_loop import PrivateValidationLoop, rearm_evaluation_loop
from .search_space import expand_grid, sample_space
from .sharded import scatter_rounds
from .targeting import find_target

log = logging.getLogger(__name__)

__all__ = ["BaseMergeSearch", "MergeSearch", "expand_grid"]

#: a proposal of a search: (candidate ``{"method": ..., **params, "weights": [...]?}``, origin)
Proposal = tuple[dict[str, Any], str]
CacheDevice = Literal["cpu", "module"]


def build_candidate(cand: Any, n_experts: int, what: str,
                    owner: str = "MergeSearch") -> tuple[MergeMethod, list[float] | None]:
    """The validated method and weights of one candidate dict; :class:`ConfigError` names ``what``."""
    if not isinstance(cand, Mapping) or "method" not in cand:
        raise ConfigError(f"{owner}: {what} must be a dict with a 'method' key, got {cand!r}")
    params = {k: v for k, v in cand.items() if k not in ("method", "weights")}
    try:
        method = get_method(cand["method"], **params)
        weights = cand.get("weights")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != n_experts:
                raise ConfigError(f"{len(weights)} weights for {n_experts} experts")
        method.check_experts(n_experts)
        if weights is not None:
            check_weights(method.name, weights, allow_negative=method.allow_negative_weights)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{owner}: {what} ({dict(cand)!r}): {e}") from None
    return method, weights


def refuse_sharded(name: str, trainer: pl.Trainer) -> None:
    """FSDP1 and DeepSpeed wrap the module in ways a search cannot write into: refuse them at
    ``setup``, before any work. ``ModelParallelStrategy`` (FSDP2, DTensor shards) is supported."""
    strategy = type(trainer.strategy).__name__
    if any(s in strategy for s in ("FSDP", "DeepSpeed")):
        raise ConfigError(f"{name}: the {strategy} strategy wraps the module in a way a merge search cannot write "
                          "into; use ModelParallelStrategy (FSDP2, fully_shard in configure_model), "
                          "strategy='ddp' or one device")


class BaseMergeSearch(Callback):
    """What every merge search shares: inputs, hooks, the evaluation of a candidate, logs, state.

    A subclass provides :meth:`_proposals` (a generator of :data:`Proposal`\\ s that receives each
    one's score), :meth:`_method` and :meth:`_config`; it may override :meth:`_score` and
    :meth:`_plan`. See the module docstring for the behaviour.
    """

    def __init__(
        self,
        experts: list[str],
        *,
        monitor: str = "val/acc_mean",
        mode: Literal["max", "min"] = "max",
        seed: int = 0,
        base: str | None = None,
        target: str | None = None,
        csv_path: str | None = None,
        limit_val_batches: int | float | None = None,
        cache_device: CacheDevice = "cpu",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not experts or isinstance(experts, (str, os.PathLike)):
            raise ConfigError(f"{name}: experts must be a non-empty list of paths")
        self.experts = [os.fspath(e) if isinstance(e, os.PathLike) else e for e in experts]
        for i, e in enumerate(self.experts):
            if isinstance(e, str) and not Path(e).exists():
                raise ConfigError(f"{name}: experts[{i}] '{e}' does not exist")
        if mode not in ("max", "min"):
            raise ConfigError(f"{name}: mode must be 'max' or 'min', got {mode!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"{name}: monitor must be a metric name")
        if limit_val_batches is not None:
            ok = (isinstance(limit_val_batches, int) and not isinstance(limit_val_batches, bool)
                  and limit_val_batches > 0) or (
                isinstance(limit_val_batches, float) and 0.0 < limit_val_batches <= 1.0)
            if not ok:
                raise ConfigError(f"{name}: limit_val_batches must be a positive int or a fraction in (0, 1], "
                                  f"got {limit_val_batches!r}")
        if cache_device not in ("cpu", "module"):
            raise ConfigError(f"{name}: cache_device must be 'cpu' or 'module', got {cache_device!r}")
        self.monitor, self.mode, self.seed = monitor, mode, int(seed)
        self.base, self.target = base, target
        self.csv_path = csv_path
        self.limit_val_batches = limit_val_batches
        self.cache_device: CacheDevice = cache_device
        self.best: dict[str, Any] | None = None
        self.best_index: int | None = None
        self.best_score: float | None = None
        self.results: list[dict[str, Any]] = []
        self.searched = False
        self.target_name: str | None = None
        self.csv_written: str | None = None
        self._searching = False
        self._config_hash: str | None = None

    # ---- what a subclass provides
    def _proposals(self) -> Generator[Proposal, float, None]:
        """Yield the candidates in evaluation order; each ``yield`` receives that candidate's score."""
        raise NotImplementedError

    def _method(self, candidate: dict[str, Any]) -> tuple[MergeMethod, list[float] | None]:
        """The method and weights that merge ``candidate``."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """Everything that defines the search (hashed into :attr:`config_hash`)."""
        raise NotImplementedError

    def _space(self) -> Space:
        """The space the experts are cached in: ``"delta"`` (the default) or ``"weight"`` (see
        :mod:`.search_cache`)."""
        return "delta"

    @property
    def score_name(self) -> str:
        """The name of the ranked score (the CSV column and the ``merge_search/`` metric)."""
        return self.monitor

    def _score(self, metrics: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        """(score, extra metrics to record) from the callback metrics of one validation epoch."""
        value = metrics.get(self.monitor)
        if value is None:
            raise MergeError(f"{type(self).__name__}: the validation loop did not log '{self.monitor}' "
                             f"(logged: {sorted(metrics)})")
        return float(value), {}

    def _plan(self, method: MergeMethod, weights: list[float] | None, inputs: SearchInputs) -> MergePlan:
        """The merge plan of one candidate on the cached inputs."""
        return build_plan(inputs.base, inputs.experts, method, weights=weights, seed=self.seed,
                          device=inputs.device)

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` beats ``b`` in this search's mode (NaN never does)."""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a > b if self.mode == "max" else a < b)

    # ---- state
    @property
    def config_hash(self) -> str:
        """Hash of :meth:`_config`, the expert and base paths replaced by their files' content identity
        (computed once, on first use: reading the files' identities is I/O, and the hash names the
        files as they were when this search was set up, as :class:`MergeCallback`'s does)."""
        if self._config_hash is None:
            text = json.dumps(identified(self._config()), sort_keys=True, default=repr)
            self._config_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._config_hash

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_hash=self.config_hash)

    def state_dict(self) -> dict[str, Any]:
        return {"searched": self.searched, "config_hash": self.config_hash, "best": self.best,
                "best_index": self.best_index, "best_score": self.best_score,
                "results": [{"index": r["index"], "score": r["score"]} for r in self.results]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config_hash") != self.config_hash:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's search state has another configuration; "
                           "its weights are restored and no search runs")
        self.searched = True  # the checkpoint's weights are restored: never search over them
        self.best = state_dict.get("best")
        self.best_index = state_dict.get("best_index")
        self.best_score = state_dict.get("best_score")

    # ---- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(type(self).__name__, trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._search(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only trainer.validate: fit's own validation epochs (and its sanity check) come after its search
        if trainer.state.fn != TrainerFn.VALIDATING or self.searched or self._searching:
            return
        self._search(trainer, pl_module)
        rearm_evaluation_loop(trainer.validate_loop)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_searched("test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_searched("predict")

    def _require_searched(self, stage: str) -> None:
        if not self.searched:
            raise MergeError(
                f"{type(self).__name__} searches on the validation loop, in trainer.fit or trainer.validate, "
                f"not in trainer.{stage}: run one of them first with this callback, pass the ckpt_path of a "
                f"run that searched, or merge the chosen candidate with MergeCallback")

    # ---- the search
    def _open_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[nn.Module, SearchInputs]:
        """Find the target, then read every input once (see :mod:`.search_cache`)."""
        opened: list[Source] = []
        try:
            for e in self.experts:
                opened.append(open_source(e))
            self.target_name, target = find_target(pl_module, opened[0], self.target)
            base = open_source(self.base) if self.base is not None else None
            if base is not None:
                opened.append(base)
            device = module_device(target) if self.cache_device == "module" else "cpu"
            label = f"<{self.target_name or 'module'} before the search>"
            if is_sharded(target):
                inputs = cache_sharded_inputs(target, opened[:len(self.experts)], Comm(trainer), base=base,
                                              space=self._space(), device=device, label=label)
            else:
                inputs = cache_inputs(target, opened[:len(self.experts)], base=base, space=self._space(),
                                      device=device, label=label)
        finally:
            for src in opened:
                src.close()
        log.info("%s: %d experts cached (%s, %.1f MiB on %s)", type(self).__name__, len(self.experts),
                 inputs.space, inputs.nbytes() / 2**20, inputs.device)
        return target, inputs

    def _merge(self, candidate: dict[str, Any], target: nn.Module, inputs: SearchInputs) -> None:
        method, weights = self._method(candidate)
        plan = self._plan(method, weights, inputs)
        if inputs.shares is not None:  # sharded: this rank merges its share, every rank gets its boxes
            assert inputs.comm is not None
            if plan.method.statistics_passes > 0 and plan.stats is None:
                compute_statistics(plan, gather=inputs.comm.gather if inputs.comm.on else None)
            scatter_rounds(plan, inputs.shares, target, inputs.comm)
            return
        names = [t.name for t in plan.tasks if find_tensor(target, t.name) is not None]
        load_into_module(target, dict(run_plan(plan, names, progress=False)), keep_backup=False)

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.searched:
            log.info("%s: already searched (best %s); not searching again", type(self).__name__, self.best)
            return
        self._searching = True
        try:
            target, inputs = self._open_inputs(trainer, pl_module)
            results = self._evaluate_all(trainer, target, inputs)
        finally:
            self._searching = False
        valid = [r for r in results if not math.isnan(r["score"])]
        if not valid:
            raise MergeError(f"{type(self).__name__}: every candidate scored NaN on '{self.score_name}'")
        best = valid[0]
        for r in valid[1:]:
            if self.better(r["score"], best["score"]):
                best = r
        self._merge(best["candidate"], target, inputs)
        self.results = results
        self.best_index, self.best_score, self.best = best["index"], best["score"], dict(best["candidate"])
        self.searched = True
        # trainer.log_dir broadcasts from rank 0 under DDP: every rank must ask
        path = Path(self.csv_path) if self.csv_path else Path(trainer.log_dir or trainer.default_root_dir) / \
            "merge_search.csv"
        if trainer.is_global_zero:
            log_rows(trainer.loggers, results, self.score_name)
            write_csv(path, results, self.score_name, self.best_index)
            self.csv_written = str(path)
            log.info("%s: chose candidate %d %s (%s = %.6f)", type(self).__name__, self.best_index, self.best,
                     self.score_name, self.best_score)

    def _evaluate_all(self, trainer: pl.Trainer, target: nn.Module, inputs: SearchInputs) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        proposals = self._proposals()
        try:
            with PrivateValidationLoop(trainer, self.limit_val_batches) as loop:
                proposal = next(proposals, None)
                while proposal is not None:
                    candidate, origin = proposal
                    self._merge(candidate, target, inputs)
                    score, metrics = self._score(loop.run())
                    inputs.backup.restore()
                    results.append({"index": len(results), "candidate": dict(candidate), "origin": origin,
                                    "score": score, "metrics": metrics})
                    log.info("%s: candidate %d %s: %s = %.6f", type(self).__name__, len(results) - 1, candidate,
                             self.score_name, score)
                    try:
                        proposal = proposals.send(score)
                    except StopIteration:
                        proposal = None
        except BaseException:
            inputs.backup.restore()
            raise
        finally:
            proposals.close()
        return results

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experts={self.experts}, monitor={self.monitor!r}, mode={self.mode!r}, "
                f"best={self.best})")


class MergeSearch(BaseMergeSearch):
    """Evaluate candidate merges on the validation loop before ``fit`` / ``validate``; keep the best.

    Args:
        experts: expert checkpoints / folders / adapters (read once, kept in memory).
        candidates: list of ``{"method": name, **params, "weights": [...] (optional)}``.
        grid: alternatively ``{"method": [...], param: [...], ...}``; the cartesian product.
        space: a random-search space ``{"method": [...], param: choices | {low, high[, log]}, ...,
            "weights": [...] | {dirichlet: ...}}`` (see :mod:`~lightning_merge.lightning.search_space`),
            alone or after ``candidates`` / ``grid``.
        num_samples: how many candidates to draw from ``space`` (required with it).
        search_seed: the seed of those draws (the same seed draws the same candidates).
        monitor: the logged validation metric to rank by (default ``val/acc_mean``).
        mode: ``"max"`` or ``"min"``.
        seed: merge seed (same for every candidate).
        base: the base model; None: the target's own weights when the search starts.
        target: dotted path of the submodule to merge into (None: found by tensor names).
        csv_path: where the per-candidate CSV goes (default ``trainer.log_dir/merge_search.csv``).
        limit_val_batches: validation batches per dataloader during the search (int or fraction);
            None: the trainer's own ``limit_val_batches``.
        cache_device: keep the cached experts on the ``"cpu"`` or on the target's device
            (``"module"``: faster merges on an accelerator, at the cost of its memory).

    Every candidate is built and validated at construction (:class:`ConfigError` naming the
    candidate or the key). After the search, :attr:`best` is the chosen candidate
    (``{"method": ..., params...}``), :attr:`results` a list of ``{"index", "candidate", "origin",
    "score", "metrics"}``.
    """

    def __init__(
        self,
        experts: list[str],
        candidates: list[dict[str, Any]] | None = None,
        grid: dict[str, list[Any]] | None = None,
        monitor: str = "val/acc_mean",
        mode: Literal["max", "min"] = "max",
        seed: int = 0,
        base: str | None = None,
        target: str | None = None,
        csv_path: str | None = None,
        limit_val_batches: int | float | None = None,
        space: dict[str, Any] | None = None,
        num_samples: int | None = None,
        search_seed: int = 0,
        cache_device: CacheDevice = "cpu",
    ) -> None:
        super().__init__(experts, monitor=monitor, mode=mode, seed=seed, base=base, target=target,
                         csv_path=csv_path, limit_val_batches=limit_val_batches, cache_device=cache_device)
        if (candidates is not None and grid is not None) or (candidates is None and grid is None and space is None):
            raise ConfigError("MergeSearch: give exactly one of candidates=[...] or grid={...}, and/or "
                              "space={...} with num_samples=N")
        if (space is None) != (num_samples is None):
            raise ConfigError("MergeSearch: space={...} and num_samples=N go together")
        if isinstance(search_seed, bool) or not isinstance(search_seed, int):
            raise ConfigError(f"MergeSearch: search_seed must be an int, got {search_seed!r}")
        listed: list[dict[str, Any]] = []
        if candidates is not None:
            if not isinstance(candidates, (list, tuple)):
                raise ConfigError(f"MergeSearch: candidates must be a list of dicts, got {type(candidates).__name__}")
            listed = [dict(c) if isinstance(c, Mapping) else c for c in candidates]
            if not listed:
                raise ConfigError("MergeSearch: no candidates")
        origin = "candidates" if candidates is not None else "grid"
        if grid is not None:
            listed = expand_grid(grid)
        sampled = sample_space(space, num_samples, search_seed, len(self.experts)) if space is not None else []
        self.candidates: list[dict[str, Any]] = listed + sampled
        self.origins = [origin] * len(listed) + ["random"] * len(sampled)
        self.space, self.num_samples, self.search_seed = space, num_samples, search_seed
        what = [f"candidate {i}" if i < len(listed) else f"candidate {i} (space sample {i - len(listed)})"
                for i in range(len(self.candidates))]
        self._methods = [build_candidate(c, len(self.experts), w) for c, w in zip(self.candidates, what)]

    def _config(self) -> dict[str, Any]:
        return {"experts": self.experts, "candidates": self.candidates, "monitor": self.monitor, "mode": self.mode,
                "seed": self.seed, "base": self.base, "target": self.target}

    def _space(self) -> Space:
        return "weight" if all(m.space == "weight" for m, _ in self._methods) else "delta"

    def _proposals(self) -> Generator[Proposal, float, None]:
        # not ``yield from``: the caller send()s each score, which a zip iterator cannot take
        for c, o in zip(self.candidates, self.origins):  # noqa: UP028
            yield c, o

    def _method(self, candidate: dict[str, Any]) -> tuple[MergeMethod, list[float] | None]:
        return self._methods[self.candidates.index(candidate)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experts={self.experts}, candidates={len(self.candidates)}, "
                f"monitor={self.monitor!r}, mode={self.mode!r}, best={self.best})")
