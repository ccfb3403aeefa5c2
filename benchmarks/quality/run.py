"""Quality benchmark: the seed papers' comparisons at small scale, on real models and data, offline.

Base model: all-MiniLM-L6-v2 (6-layer BERT encoder). Tasks: sentiment, subjectivity, BBC topic,
WordNet supersense (:mod:`lightning_merge.examples.corpora`). Frozen per-task probe heads; experts fine-tune
the encoder on one task each, in two regimes: ``full`` (every encoder weight but the word
embeddings) and ``lora`` (PEFT LoRA r=8 on the attention ``query``/``value`` projections, the
adaptive-RMS paper's setting; merged in exact dense-delta space). Every merge is a
:class:`lightning_merge.MergeCallback` on ``trainer.test`` of the base model: the benchmark runs the
product's own public API, so it is also an end-to-end check. One merge (DPPA, deterministic) is also
written by the command line, ``lightning-merge merge`` on a mergekit-style YAML, and that HF folder
is scored too: its per-example outcomes must equal the callback's (``kind: "cli"`` row).

Every evaluation is appended to ``results.json`` (per task: accuracy and the per-example
correctness bits, so confidence intervals over test examples and paired differences can be
computed later); a restarted run skips what is already there. :mod:`report` turns the file into
tables and plots.

    python benchmarks/quality/run.py                 # the full grid (hours on 2 cores; run it in the background)
    python benchmarks/quality/run.py --quick         # < 15 minutes: a small grid, full fine-tunes only
    python benchmarks/quality/report.py              # tables + plots from results.json
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from lightning_merge import MergeCallback  # noqa: E402
from lightning_merge.examples.corpora import WORDNET_NOUNS, minilm_dir, prepare  # noqa: E402
from lightning_merge.examples.workflow import (  # noqa: E402
    Experiment,
    evaluate,
    prepare_heads,
    quiet_runtime,
    train_expert,
)
from lightning_merge.methods.registry import get_method  # noqa: E402

log = logging.getLogger("quality")

TASKS = ("sentiment", "subjectivity", "topic", "supersense")
DROPS = (0.1, 0.3, 0.5, 0.7, 0.9)
SEEDS = (0, 1, 2)
MAX_LENGTH = 48

#: expert training per regime
REGIMES: dict[str, dict[str, Any]] = {
    "full": {"finetune": "full", "lr": 1e-4},
    "lora": {"finetune": "lora", "lr": 1e-3, "lora_r": 8, "lora_alpha": 16},
}


def grid(quick: bool) -> list[dict[str, Any]]:
    """Every merge of the benchmark: ``{"family", "method", "params", "seeds", "drop"}``.

    The TIES-style families share the paper pipeline drop -> elect -> disjoint mean -> lambda = 1 and
    differ only in the drop (DELLA paper's comparison): TIES (magnitude top-k, no rescale), DARE-TIES
    (Bernoulli, 1/(1-p) rescale), DELLA (MagPrune, rescale; rank within each row or whole tensor).
    Sum-style merges (task arithmetic, DARE-linear) use lambda = 0.4 for the four experts; DPPA, which
    sums amplified deltas (top partition x 1.8), lambda = 0.25 (its first rows at lambda = 1 collapsed
    to 52% mean accuracy, as task arithmetic does at lambda = 1). DARE-TIES and DELLA also run at
    lambda = 0.5 for p >= 0.5 (added after the first round showed the rescale overshooting at lambda = 1;
    DELLA with whole-tensor ranking at lambda = 0.5 was added after the rest of the grid had run).
    """
    drops = (0.3, 0.7) if quick else DROPS
    seeds = (0,) if quick else SEEDS
    out: list[dict[str, Any]] = [{"family": "soup", "method": "task_arithmetic", "params": {"lambda": 0.25},
                                  "seeds": (0,), "drop": None}]
    for lam in ((0.3, 1.0) if quick else (0.2, 0.3, 0.4, 0.6, 1.0)):
        out.append({"family": "task_arithmetic", "method": "task_arithmetic", "params": {"lambda": lam},
                    "seeds": (0,), "drop": None})
    for p in drops:
        d = round(1 - p, 4)
        out.append({"family": "ties", "method": "ties", "params": {"density": d, "lambda": 1.0}, "seeds": (0,),
                    "drop": p})
        out.append({"family": "dare_ties", "method": "dare_ties",
                    "params": {"density": d, "lambda": 1.0, "normalize": True}, "seeds": seeds, "drop": p})
        out.append({"family": "della", "method": "della", "params": {"density": d, "epsilon": 0.14, "lambda": 1.0},
                    "seeds": seeds, "drop": p})
        out.append({"family": "dppa", "method": "dppa",
                    "params": {"density_top": d, "density_band": min(1.0, round(d + 0.1, 4)), "lambda": 0.25},
                    "seeds": (0,), "drop": p})
        if not quick:
            out.append({"family": "dare_linear", "method": "dare_linear", "params": {"density": d, "lambda": 0.4},
                        "seeds": seeds, "drop": p})
            out.append({"family": "della_layer", "method": "della",
                        "params": {"density": d, "epsilon": 0.14, "lambda": 1.0, "rank_scope": "layer"},
                        "seeds": seeds, "drop": p})
        if not quick and p in (0.5, 0.7, 0.9):
            # the rescaled drops at a smaller lambda too: at lambda = 1 the 1/(1-p) rescale overshoots
            # (the papers tune lambda per method); the report keeps each family's best per drop rate
            for fam, extra in (("dare_ties", {"normalize": True}), ("della", {"epsilon": 0.14}),
                               ("della_layer", {"epsilon": 0.14, "rank_scope": "layer"})):
                out.append({"family": fam, "method": fam.removesuffix("_layer"),
                            "params": {"density": d, **extra, "lambda": 0.5}, "seeds": seeds, "drop": p})
        if not quick and p in (0.3, 0.5, 0.7):
            out.append({"family": "dare_ties_norescale", "method": "dare_ties",
                        "params": {"density": d, "lambda": 1.0, "normalize": True, "rescale": "none"},
                        "seeds": seeds, "drop": p})
        if p in ((0.7,) if quick else (0.5, 0.7, 0.9)):
            # both branches of the CV rule, forced: pooled mean (low CV) and each model's own mean (high CV)
            for branch, thr in (("adaptive_rms_pooled", 1e9), ("adaptive_rms_own", 0.0)):
                for lam in ((1.0,) if quick else (1.0, 0.5)):  # like DARE-TIES, lambda 0.5 too
                    out.append({"family": branch, "method": "adaptive_rms",
                                "params": {"drop_rate": p, "cv_threshold": thr, "lambda": lam}, "seeds": seeds,
                                "drop": p})
    return out


def settings(quick: bool) -> tuple[tuple[str, ...], dict[str, int], dict[str, int], dict[str, Any]]:
    """(tasks, split sizes, the topic task's sizes, the results file's ``meta``) of a mode."""
    tasks = TASKS if WORDNET_NOUNS.is_file() else tuple(t for t in TASKS if t != "supersense")
    sizes = {"probe": 500, "train": 1000 if quick else 2000, "test": 500 if quick else 2000}
    topic = {"train": 800, "test": -1}  # ~2.1k headlines: 500 probe, 800 train, the rest (~796) test
    meta = {"mode": "quick" if quick else "full", "tasks": list(tasks), "sizes": sizes, "topic_sizes": topic,
            "base": "all-MiniLM-L6-v2"}
    return tasks, sizes, topic, meta


def key(regime: str, kind: str, name: str, params: dict[str, Any], seed: int) -> str:
    return json.dumps([regime, kind, name, params, seed], sort_keys=True)


def pack(bits: torch.Tensor) -> str:
    """Per-example correctness as base64 of packed bits (``numpy.packbits`` order)."""
    import numpy as np

    return base64.b64encode(np.packbits(bits.numpy().astype(np.uint8)).tobytes()).decode()


class Store:
    """``results.json``: a list of rows, rewritten atomically after each evaluation."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else {"meta": meta, "rows": []}
        if data.get("meta") != meta:
            log.warning("results file %s was made with other settings (%s); starting it again", path,
                        data.get("meta"))
            data = {"meta": meta, "rows": []}
        self.data = data
        self.done = {r["key"] for r in data["rows"]}

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.done.add(row["key"])
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=0))
        os.replace(tmp, self.path)


def scored(exp: Experiment, store: Store, *, regime: str, kind: str, name: str, params: dict[str, Any],
           seed: int, extra: dict[str, Any], **kwargs: Any) -> None:
    k = key(regime, kind, name, params, seed)
    if k in store.done:
        return
    t0 = time.perf_counter()
    bits: dict[str, torch.Tensor] = {}
    acc = evaluate(exp, outcomes=bits, **kwargs)
    store.add({"key": k, "regime": regime, "kind": kind, "name": name, "params": params, "seed": seed, **extra,
               "acc": acc, "n": {t: len(b) for t, b in bits.items()}, "bits": {t: pack(b) for t, b in bits.items()},
               "seconds": round(time.perf_counter() - t0, 2)})
    log.info("%-5s %-22s %-60s seed %d: %s (%.0f s)", regime, kind if kind != "merge" else extra.get("family"),
             json.dumps(params), seed, "  ".join(f"{t[:4]} {100 * v:.1f}" for t, v in acc.items()),
             time.perf_counter() - t0)


#: the merge that the command line writes too (``cli_check``): deterministic, in every mode's grid
CLI_MERGE = ("dppa", {"density_top": 0.3, "density_band": 0.4, "lambda": 0.25})


def cli_check(exp: Experiment, store: Store, experts: list[str], out: Path) -> bool:
    """Write ``CLI_MERGE`` with ``lightning-merge merge`` (mergekit-style YAML, our method name and
    parameter names), score the HF folder like any model, and compare its per-example outcomes with
    the ``MergeCallback`` row of the same merge. Returns whether they are identical."""
    name, params = CLI_MERGE
    k = key("full", "cli", name, params, 0)
    if k not in store.done:
        out.mkdir(parents=True, exist_ok=True)
        config = out / f"{name}.yml"
        models = "".join(f"  - model: {json.dumps(e)}\n" for e in experts)
        config.write_text(f"merge_method: {name}\nbase_model: {json.dumps(exp.base)}\nmodels:\n{models}"
                          f"parameters: {json.dumps(params)}\ndtype: float32\n")
        cli = Path(sys.executable).with_name("lightning-merge")
        cmd = [str(cli) if cli.is_file() else "lightning-merge", "merge", str(config), str(out / name), "--seed", "0",
               "--overwrite"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        scored(exp, store, regime="full", kind="cli", name=name, params=params, seed=0,
               extra={"command": " ".join(cmd[1:])}, model=str(out / name))
    rows = {r["key"]: r for r in store.data["rows"]}
    merged = rows.get(key("full", "merge", name, params, 0))
    same = merged is not None and merged["bits"] == rows[k]["bits"]
    log.info("command-line %s merge: per-example outcomes %s the MergeCallback's", name,
             "identical to" if same else ("DIFFERENT from" if merged else "not comparable (no callback row) with"))
    return same


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, smaller splits, full fine-tunes only")
    ap.add_argument("--regimes", nargs="+", default=None, choices=sorted(REGIMES))
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "_data" / "quality")
    ap.add_argument("--results", type=Path, default=None, help="default: benchmarks/quality/results[_quick].json")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    quiet_runtime(args.threads)

    quick = args.quick
    regimes = args.regimes or (["full"] if quick else ["full", "lora"])
    tasks, sizes, topic, meta = settings(quick)
    mode = meta["mode"]
    work = args.workdir / mode
    files = prepare(work / "data", list(tasks), sizes, task_sizes={"topic": topic})
    exp = Experiment(base=minilm_dir(), files=files, heads=str(work / "heads.safetensors"), max_length=MAX_LENGTH)
    prepare_heads(exp)
    results = args.results or HERE / f"results{'_quick' if quick else ''}.json"
    store = Store(results, meta)
    t_start = time.perf_counter()

    scored(exp, store, regime="-", kind="base", name="base", params={}, seed=0, extra={})
    experts: dict[str, list[str]] = {}
    for regime in regimes:
        cfg = REGIMES[regime]
        experts[regime] = []
        for task in tasks:
            t0 = time.perf_counter()
            experts[regime].append(train_expert(exp, task, work / "experts" / regime / task, **cfg))
            log.info("%s expert %s ready (%.0f s)", regime, task, time.perf_counter() - t0)
            path = experts[regime][-1]
            scored(exp, store, regime=regime, kind="expert", name=task, params=cfg, seed=0, extra={"task": task},
                   model=path if regime == "full" else None,
                   callbacks=[] if regime == "full" else [MergeCallback([path], "task_arithmetic", target="model")])
    # seed 0 of every merge in every regime first, then the further seeds: a partial run is a complete picture
    for round_ in range(max(len(g["seeds"]) for g in grid(quick))):
        for regime in regimes:
            for g in grid(quick):
                if round_ >= len(g["seeds"]):
                    continue
                seed = g["seeds"][round_]
                method = get_method(g["method"], **g["params"])
                scored(exp, store, regime=regime, kind="merge", name=g["method"], params=g["params"], seed=seed,
                       extra={"family": g["family"], "drop": g["drop"]},
                       callbacks=[MergeCallback(experts[regime], method, target="model", seed=seed)])
    if "full" in regimes and not cli_check(exp, store, experts["full"], work / "cli"):
        raise SystemExit("the command-line merge scored differently from the MergeCallback merge: a bug")
    log.info("done in %.0f s; %d rows in %s", time.perf_counter() - t_start, len(store.data["rows"]), results)
    from report import main as report_main  # noqa: E402

    return report_main(["--results", str(results)])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
