"""``MergeSearch``: pick the best of several merges on the module's own validation loop, then train it.

At ``on_fit_start`` (after the strategy has set up the model, before the sanity check and the
first training step) the callback

1. reads every expert **once** into memory (:class:`StateDictSource`, keys aligned to the target
   submodule) and takes a CPU copy of the target's pre-merge weights as the base (or reads
   ``base=`` once);
2. for each candidate: builds a plan on those in-memory sources, merges, copies the result into the
   target (in place, :func:`load_into_module`), runs the fit's own validation loop
   (``trainer.fit_loop.epoch_loop.val_loop.run()``, exactly what Lightning runs between epochs),
   reads ``trainer.callback_metrics[monitor]``, and puts the base weights back;
3. merges the best candidate into the target; ``fit`` then continues (sanity check, training)
   from it.

How the validation loop is driven (Lightning 2.6). During the search the trainer is switched to
the validating stage, its loggers and its other callbacks are detached (so ModelCheckpoint /
EarlyStopping / progress bars do not react to the candidate runs and the module's logged
validation metrics do not reach the logger), and ``limit_val_batches`` is overridden when given.
Afterwards the logger connector's results, the loop's progress counters and its dataloaders are
reset, and the trainer's stage, loggers and callbacks are restored.

Logging (rank zero only): one ``log_metrics`` call per candidate with ``step`` = candidate index
(``merge_search/<monitor>``, ``merge_search/candidate``), and a CSV (default
``trainer.log_dir/merge_search.csv``) with one row per candidate: index, method, every parameter,
weights, the metric, and whether it was chosen.

Resume: :meth:`state_dict` holds ``searched``, ``best``, the results and a configuration hash; a
fit resumed from a checkpoint made with the same configuration does not search again (the
checkpoint's weights are restored before ``on_fit_start``). A second ``fit`` with the same
callback instance does not search again either.

Ranks: every rank evaluates the same candidates with the same seeds (merges are deterministic per
seed and do not depend on the rank); the metric is the one Lightning reduces across ranks when the
module logs with ``sync_dist``/torchmetrics. Only tested in a single process.

Not supported yet: searching inside ``trainer.validate`` (only ``fit`` searches); FSDP/DeepSpeed
sharded models.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..engine import build_plan, run_plan
from ..errors import ConfigError, MergeError
from ..methods.base import MergeMethod, get_method
from ..sources.base import ModuleSource, Source, StateDictSource, align
from ..sources.resolve import open_source
from ..targets.module import WeightBackup, find_tensor, load_into_module
from .callback import find_target

log = logging.getLogger(__name__)

__all__ = ["MergeSearch", "expand_grid"]


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid`` (each value a list of choices; a scalar is one choice)."""
    if "method" not in grid:
        raise ConfigError("MergeSearch: grid needs a 'method' key (a list of method names)")
    keys = list(grid)
    choices = [list(v) if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    for k, c in zip(keys, choices):
        if not c:
            raise ConfigError(f"MergeSearch: grid['{k}'] is empty")
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


class MergeSearch(Callback):
    """Evaluate candidate merges on the validation loop at the start of ``fit``; train the best.

    Args:
        experts: expert checkpoints / folders / adapters (read once, kept in memory).
        candidates: list of ``{"method": name, **params, "weights": [...] (optional)}``.
        grid: alternatively ``{"method": [...], param: [...], ...}``; the cartesian product.
        monitor: the logged validation metric to rank by (default ``val/acc_mean``).
        mode: ``"max"`` or ``"min"``.
        seed: merge seed (same for every candidate).
        base: the base model; None: the target's own weights at ``on_fit_start``.
        target: dotted path of the submodule to merge into (None: found by tensor names).
        csv_path: where the per-candidate CSV goes (default ``trainer.log_dir/merge_search.csv``).
        limit_val_batches: validation batches per dataloader during the search (int or fraction);
            None: the trainer's own ``limit_val_batches``.

    After the search, :attr:`best` is the chosen candidate (``{"method": ..., params...}``),
    :attr:`results` a list of ``{"index", "candidate", "score"}``.
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
    ) -> None:
        super().__init__()
        if not experts or isinstance(experts, (str, os.PathLike)):
            raise ConfigError("MergeSearch: experts must be a non-empty list of paths")
        self.experts = [os.fspath(e) if isinstance(e, os.PathLike) else e for e in experts]
        for i, e in enumerate(self.experts):
            if isinstance(e, str) and not Path(e).exists():
                raise ConfigError(f"MergeSearch: experts[{i}] '{e}' does not exist")
        if (candidates is None) == (grid is None):
            raise ConfigError("MergeSearch: give exactly one of candidates=[...] or grid={...}")
        cands = expand_grid(grid) if grid is not None else [dict(c) for c in candidates]  # type: ignore[union-attr]
        if not cands:
            raise ConfigError("MergeSearch: no candidates")
        self.candidates = cands
        self._methods = [self._build(i, c) for i, c in enumerate(cands)]
        if mode not in ("max", "min"):
            raise ConfigError(f"MergeSearch: mode must be 'max' or 'min', got {mode!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError("MergeSearch: monitor must be a metric name")
        if limit_val_batches is not None:
            ok = (isinstance(limit_val_batches, int) and not isinstance(limit_val_batches, bool)
                  and limit_val_batches > 0) or (
                isinstance(limit_val_batches, float) and 0.0 < limit_val_batches <= 1.0)
            if not ok:
                raise ConfigError("MergeSearch: limit_val_batches must be a positive int or a fraction in (0, 1], "
                                  f"got {limit_val_batches!r}")
        self.monitor, self.mode, self.seed = monitor, mode, int(seed)
        self.base, self.target = base, target
        self.csv_path = csv_path
        self.limit_val_batches = limit_val_batches
        self.config_hash = hashlib.sha256(json.dumps(
            {"experts": self.experts, "candidates": cands, "monitor": monitor, "mode": mode, "seed": self.seed,
             "base": base, "target": target}, sort_keys=True, default=repr).encode()).hexdigest()[:16]
        self.best: dict[str, Any] | None = None
        self.best_index: int | None = None
        self.best_score: float | None = None
        self.results: list[dict[str, Any]] = []
        self.searched = False
        self.target_name: str | None = None

    def _build(self, i: int, cand: dict[str, Any]) -> tuple[MergeMethod, list[float] | None]:
        if not isinstance(cand, Mapping) or "method" not in cand:
            raise ConfigError(f"MergeSearch: candidate {i} must be a dict with a 'method' key, got {cand!r}")
        params = {k: v for k, v in cand.items() if k not in ("method", "weights")}
        try:
            method = get_method(cand["method"], **params)
        except ConfigError as e:
            raise ConfigError(f"MergeSearch: candidate {i} ({cand!r}): {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"MergeSearch: candidate {i} ({cand!r}): {e}") from None
        weights = cand.get("weights")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(self.experts):
                raise ConfigError(f"MergeSearch: candidate {i} has {len(weights)} weights for "
                                  f"{len(self.experts)} experts")
        method.check_experts(len(self.experts))
        return method, weights

    # ---- state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(config_hash=self.config_hash)

    def state_dict(self) -> dict[str, Any]:
        return {"searched": self.searched, "config_hash": self.config_hash, "best": self.best,
                "best_index": self.best_index, "best_score": self.best_score,
                "results": [{"index": r["index"], "score": r["score"]} for r in self.results]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config_hash") != self.config_hash:
            rank_zero_warn("MergeSearch: the checkpoint's search state has another configuration; its weights are "
                           "restored and no search runs")
        self.searched = True  # the checkpoint's weights are restored: never search over them
        self.best = state_dict.get("best")
        self.best_index = state_dict.get("best_index")
        self.best_score = state_dict.get("best_score")

    # ---- inputs, read once
    def _cache(self, target: nn.Module, first: Source) -> tuple[Source, list[Source], WeightBackup]:
        """(base, experts, backup): every input read once into CPU memory; ``first`` is experts[0], open."""
        keys = ModuleSource(target).keys()
        backup = WeightBackup(target, keys)  # CPU copy of the pre-merge weights
        if self.base is None:
            base: Source = StateDictSource(backup.saved, label=f"<{self.target_name or 'module'} before the search>")
        else:
            src = open_source(self.base)
            try:
                aligned = align(src, keys)
                base = StateDictSource({k: aligned.get(k).detach().to("cpu", copy=True) for k in aligned.keys()},
                                       label=src.label)
            finally:
                src.close()
        experts: list[Source] = []
        for i, e in enumerate(self.experts):
            src = first if i == 0 else open_source(e)
            try:
                src.validate_against(base)
                aligned = align(src, base.keys())
                experts.append(StateDictSource(
                    {k: aligned.get(k).detach().to("cpu", copy=True) for k in aligned.keys()},
                    label=src.label, kind=src.kind))
            finally:
                if i:
                    src.close()
        return base, experts, backup

    def _merge(self, i: int, target: nn.Module, base: Source, experts: list[Source]) -> None:
        method, weights = self._methods[i]
        plan = build_plan(base, experts, method, weights=weights, seed=self.seed)
        names = [t.name for t in plan.tasks if find_tensor(target, t.name) is not None]
        load_into_module(target, dict(run_plan(plan, names, progress=False)), keep_backup=False)

    # ---- the validation loop
    def _evaluate(self, trainer: pl.Trainer) -> float:
        loop = trainer.fit_loop.epoch_loop.val_loop
        trainer._logger_connector.reset_results()
        trainer._logger_connector.reset_metrics()
        trainer.validating = True
        loop._combined_loader = None  # re-request with the search's limit
        loop.run()
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise MergeError(f"MergeSearch: the validation loop did not log '{self.monitor}' (logged: "
                             f"{sorted(trainer.callback_metrics)})")
        return float(value)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.searched:
            log.info("MergeSearch: already searched (best %s); not searching again", self.best)
            return
        from lightning.pytorch.loops.utilities import _reset_progress

        first = open_source(self.experts[0])
        try:
            self.target_name, target = find_target(pl_module, first, self.target)
            base, experts, backup = self._cache(target, first)
        finally:
            first.close()
        loop = trainer.fit_loop.epoch_loop.val_loop
        stage = trainer.state.stage
        loggers, callbacks = trainer.loggers, trainer.callbacks
        limit = trainer.limit_val_batches
        scores: list[float] = []
        try:
            trainer.loggers = []
            trainer.callbacks = []
            if self.limit_val_batches is not None:
                trainer.limit_val_batches = self.limit_val_batches
            for i in range(len(self.candidates)):
                self._merge(i, target, base, experts)
                scores.append(self._evaluate(trainer))
                backup.restore()
                log.info("MergeSearch: candidate %d %s: %s = %.6f", i, self.candidates[i], self.monitor, scores[-1])
        except BaseException:
            backup.restore()
            raise
        finally:
            trainer.loggers, trainer.callbacks = loggers, callbacks
            trainer.limit_val_batches = limit
            trainer._logger_connector.reset_results()
            trainer._logger_connector.reset_metrics()
            _reset_progress(loop)
            loop._combined_loader = None
            trainer.state.stage = stage
            pl_module.train()
        valid = [(s, i) for i, s in enumerate(scores) if not math.isnan(s)]
        if not valid:
            raise MergeError(f"MergeSearch: every candidate scored NaN on '{self.monitor}'")
        sign = 1.0 if self.mode == "max" else -1.0
        best_i = max(valid, key=lambda si: (sign * si[0], -si[1]))[1]  # ties: the first candidate
        self._merge(best_i, target, base, experts)
        self.best_index, self.best_score, self.best = best_i, scores[best_i], dict(self.candidates[best_i])
        self.results = [{"index": i, "candidate": dict(c), "score": s}
                        for i, (c, s) in enumerate(zip(self.candidates, scores))]
        self.searched = True
        # trainer.log_dir broadcasts from rank 0 under DDP: every rank must ask
        path = Path(self.csv_path) if self.csv_path else Path(trainer.log_dir or trainer.default_root_dir) / \
            "merge_search.csv"
        if trainer.is_global_zero:
            self._log(trainer, path)
            log.info("MergeSearch: chose candidate %d %s (%s = %.6f)", best_i, self.best, self.monitor,
                     self.best_score)

    # ---- logging
    def _log(self, trainer: pl.Trainer, path: Path) -> None:
        for logger in trainer.loggers:
            for r in self.results:
                logger.log_metrics({f"merge_search/{self.monitor}": r["score"],
                                    "merge_search/candidate": float(r["index"])}, step=r["index"])
            logger.save()
        path.parent.mkdir(parents=True, exist_ok=True)
        params = list(dict.fromkeys(k for c in self.candidates for k in c if k not in ("method", "weights")))
        fields = ["index", "method", *params, "weights", self.monitor, "best"]
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in self.results:
                c = r["candidate"]
                w.writerow({"index": r["index"], "method": c["method"],
                            **{p: json.dumps(c[p]) if isinstance(c.get(p), (list, dict)) else c.get(p, "")
                               for p in params},
                            "weights": json.dumps(c["weights"]) if "weights" in c else "",
                            self.monitor: r["score"], "best": int(r["index"] == self.best_index)})
        os.replace(tmp, path)
        self.csv_written = str(path)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experts={self.experts}, candidates={len(self.candidates)}, "
                f"monitor={self.monitor!r}, mode={self.mode!r}, best={self.best})")

