"""Learned merges on the quality benchmark: AdaMerging (layer- and task-wise) and DAM against the static merges.

Uses the experts that ``run.py`` trained and cached (``<workdir>/<mode>/experts/<regime>/<task>``) and
the same data files, heads and test splits (read only, never rewritten). For each learned family, a
:class:`lightning_merge.learned.LearnedMerge` wraps the benchmark's :class:`EncoderClassifier` through
:class:`~lightning_merge.examples.encoder.TaskLogits` (only the encoder is merged; the probe heads
stay frozen) and trains its merge coefficients with ``trainer.fit`` on per-task batches of the
TRAIN splits (:class:`~lightning_merge.learned.PerTaskTextDataModule`, ``batch_size`` rows of every
task per step):

* ``adamerging_layer``: one λ per expert and parameter tensor (``granularity="tensor"``), objective the
  Shannon entropy of the merged model's predictions on unlabelled rows (labels dropped), λ₀ = 0.3,
  Adam lr 1e-3 (FusionBench's layer-wise AdaMerging, which runs 1000 steps on a GPU);
* ``adamerging_task``: the same with one λ per expert (``granularity="task"``);
* ``dam``: DAM (``granularity="column"``, weight space, per-input-column coefficients of every linear
  layer), objective Σ_m T²·KL(expert m ‖ merged) on expert m's own task rows, T = 2, similarity
  penalty 0.01, Adam lr 1e-3, coefficients from 1/M (biases from 1.0): LearnedMerge's spec defaults;
  and the same with the bias coefficients from 1/M too (``bias_init=0.25``: the merge starts as the
  uniform soup; with 1.0 BERT's biases start as the sum of the four experts' biases).

Steps: ``--steps`` (default 150: about 3 s a step on one CPU thread for 4 tasks × 16 rows, so 5-8
minutes per family; FusionBench's 1000 steps would take ~50 minutes each here).

Each merged encoder is exported (``export(target_only=True)``) and scored on the test splits with
``workflow.evaluate`` exactly as ``run.py`` scores the static merges; the rows (same schema, same
``meta``) go to ``results_learned.json`` so that a running ``run.py`` keeps ``results.json`` to
itself. ``--regime lora`` merges the LoRA experts (read as their exact dense deltas); its plots are
named ``learned_lora_<family>_coefficients.png``. One seed: given the data order (seeded) and no
dropout, training is deterministic. The learned coefficients by layer are plotted to
``learned_<family>_coefficients.png`` beside the results.

    python benchmarks/quality/learned.py --threads 1                # every family, the default steps
    python benchmarks/quality/learned.py --steps 3 --results /tmp/x.json   # a smoke run
    python benchmarks/quality/report.py --results benchmarks/quality/results.json \
        benchmarks/quality/results_learned.json                      # one report over both files
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import MAX_LENGTH, REGIMES, Store, key, scored, settings  # noqa: E402

from lightning_merge.examples.corpora import minilm_dir  # noqa: E402
from lightning_merge.examples.encoder import TaskLogits  # noqa: E402
from lightning_merge.examples.workflow import Experiment, quiet_runtime  # noqa: E402
from lightning_merge.learned import LearnedMerge, PerTaskTextDataModule  # noqa: E402
from lightning_merge.learned.export import layer_means  # noqa: E402

log = logging.getLogger("quality")

_DAM = {"granularity": "column", "objective": "dam", "lr": 1e-3, "temperature": 2.0, "similarity_weight": 0.01}
#: family -> [(LearnedMerge method name, LearnedMerge arguments)]. DAM twice: the reference's init (bias
#: coefficients start at 1.0, ``bias_init="sum"``: BERT's biases start as the SUM of the 4 experts'),
#: and biases from 1/M like every other coefficient (the merge starts as the uniform soup; now the default)
FAMILIES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "adamerging_layer": [("adamerging", {"granularity": "tensor", "objective": "entropy", "init": 0.3, "lr": 1e-3})],
    "adamerging_task": [("adamerging", {"granularity": "task", "objective": "entropy", "init": 0.3, "lr": 1e-3})],
    "dam": [("dam", {**_DAM, "bias_init": "sum"}), ("dam", {**_DAM, "bias_init": 0.25})],
}
DEFAULT_STEPS = 150


def experiment(work: Path, tasks: tuple[str, ...], sizes: dict[str, int], topic: dict[str, int]) -> Experiment:
    """run.py's experiment, from the files it wrote (checked against their ``meta.json``, never rewritten)."""
    files: dict[str, dict[str, str]] = {}
    for t in tasks:
        want = {**sizes, **({"train": topic["train"], "test": topic["test"]} if t == "topic" else {})}
        meta_path = work / "data" / t / "meta.json"
        if not meta_path.is_file() or json.loads(meta_path.read_text()).get("sizes") != want:
            raise SystemExit(f"{meta_path}: missing or made with other sizes than {want}; run run.py first")
        files[t] = {s: str(work / "data" / t / f"{s}.jsonl") for s in want}
    heads = work / "heads.safetensors"
    if not heads.is_file():
        raise SystemExit(f"{heads} missing; run run.py first")
    return Experiment(base=minilm_dir(), files=files, heads=str(heads), max_length=MAX_LENGTH)


class LossLog(pl.Callback):
    """Records the training loss of every step; logs the mean of every ``every`` steps."""

    def __init__(self, family: str, every: int) -> None:
        self.family, self.every, self.losses = family, every, []
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        n = len(self.losses)
        if n % self.every == 0:
            recent = self.losses[-self.every:]
            log.info("%s step %d: loss %.4f (mean of the last %d), %.1f s/step", self.family, n,
                     sum(recent) / len(recent), len(recent), (time.perf_counter() - self.t0) / n)


def train(exp: Experiment, experts: list[str], family: str, kwargs: dict[str, Any], *, steps: int, batch_size: int,
          out: Path, plot: Path) -> dict[str, Any]:
    """Fit the coefficients (LearnedMerge ``kwargs``), export the merged encoder to ``out``; return the
    training record."""
    pl.seed_everything(0, workers=True, verbose=False)
    dm = PerTaskTextDataModule(exp.base, train_files={t: exp.files[t]["train"] for t in exp.tasks},
                               max_length=exp.max_length, batch_size=batch_size, seed=0)
    lm = LearnedMerge(TaskLogits(exp.module(), task_names=list(exp.tasks)), experts, target="classifier.model",
                      expert_tasks=list(exp.tasks) if kwargs["objective"] == "dam" else None, **kwargs)
    losses = LossLog(family, every=max(1, steps // 10))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, callbacks=[losses])
    t0 = time.perf_counter()
    trainer.fit(lm, datamodule=dm)
    seconds = time.perf_counter() - t0
    folder = lm.export(out, target_only=True, overwrite=True)
    shutil.copy(Path(folder) / "learned_coefficients" / "coefficients.png", plot)
    k = max(1, min(10, len(losses.losses) // 4))
    layers, means = layer_means(lm)
    return {"model": str(folder), "train_seconds": round(seconds, 1), "steps_done": len(losses.losses),
            "loss_first": sum(losses.losses[:k]) / k, "loss_last": sum(losses.losses[-k:]) / k,
            "coefficients": {"layers": layers, "experts": list(exp.tasks),
                             "mean_by_layer": [[round(v, 4) for v in row] for row in means]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", default="full", choices=sorted(REGIMES))
    ap.add_argument("--quick", action="store_true", help="use run.py --quick's experts and data")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per family")
    ap.add_argument("--batch-size", type=int, default=16, help="rows of EVERY task per step")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "_data" / "quality",
                    help="run.py's --workdir (experts under <workdir>/<mode>/experts/<regime>/<task>)")
    ap.add_argument("--outdir", type=Path, default=ROOT / "benchmarks" / "_data" / "quality_learned",
                    help="where the merged encoders are written (<outdir>/<mode>/<regime>/<family>)")
    ap.add_argument("--results", type=Path, default=None,
                    help="default: benchmarks/quality/results_learned[_quick].json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    quiet_runtime(args.threads)

    tasks, sizes, topic, meta = settings(args.quick)
    work = args.workdir / meta["mode"]
    exp = experiment(work, tasks, sizes, topic)
    experts = [str(work / "experts" / args.regime / t) for t in tasks]
    missing = [e for e in experts if not any(Path(e).glob("*.safetensors"))]
    if missing:
        raise SystemExit(f"experts not trained yet: {missing} (run.py trains them)")
    results = args.results or HERE / f"results_learned{'_quick' if args.quick else ''}.json"
    store = Store(results, meta)
    for family, name, kwargs in ((f, n, kw) for f in args.families for n, kw in FAMILIES[f]):
        params = {**kwargs, "steps": args.steps, "batch_size": args.batch_size, "data": "train"}
        if key(args.regime, "merge", name, params, 0) in store.done:
            log.info("%s %s: already in %s", family, json.dumps(kwargs), results)
            continue
        bias = kwargs.get("bias_init", "sum")  # the rows of the reference's init kept their old name
        variant = family + ("" if bias == "sum" else "_bias" + str(bias))
        regime_tag = "" if args.regime == "full" else f"_{args.regime}"
        plot = results.with_name(f"{results.stem.replace('results_', '')}{regime_tag}_{variant}_coefficients.png")
        rec = train(exp, experts, family, kwargs, steps=args.steps, batch_size=args.batch_size,
                    out=args.outdir / meta["mode"] / args.regime / variant, plot=plot)
        log.info("%s: %d steps in %.0f s (%.2f s/step), loss %.4f -> %.4f; coefficients plotted to %s", family,
                 rec["steps_done"], rec["train_seconds"], rec["train_seconds"] / max(1, rec["steps_done"]),
                 rec["loss_first"], rec["loss_last"], plot)
        extra = {"family": family, "drop": None, **{k: v for k, v in rec.items() if k != "model"}}
        scored(exp, store, regime=args.regime, kind="merge", name=name, params=params, seed=0, extra=extra,
               model=rec["model"])
    print(f"{len(store.data['rows'])} rows in {results}")  # noqa: T201 - a script's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
