"""Causal-LM benchmark: SmolLM2-135M-Instruct experts (LoRA q/v and upper-block full fine-tunes) merged,
searched and fine-tuned in the loop, scored by label-word likelihood on four real offline tasks.

Stages, in the order that gives the most informative results first (each one cached; a rerun
skips what is done; a stage builds what it needs from earlier stages if missing):

1. ``base``     float32 base folder from the GGUF file, prompts + label words, the base's scores;
2. ``lora``     LoRA r 8 on q_proj/v_proj per task (``trainer.fit``; PEFT adapters) and their scores;
3. ``merges``   every family on the LoRA experts by ``MergeCallback`` at ``trainer.test`` (drop 0.7);
4. ``peft``     LoRA experts merged *to a LoRA adapter* (``merge_models(out_format="peft")``), scored,
                with the truncated-SVD reconstruction error per module;
5. ``full``     full fine-tunes of the upper blocks (``cfg["full_layers"]``) per task, and their merges;
6. ``search``   ``MergeSearch`` over LoRA merges on the validation splits, then a brief multi-task
                fine-tune of the chosen merge, in one ``trainer.fit``; both scored on test;
7. ``ddp``      one merge scored with 2-process DDP (gloo) against 1 process, example by example;
8. ``sweep``    drop rates 0.3 / 0.5 / 0.9 (and DARE-TIES without rescale) on the LoRA experts;
9. ``report``   tables with intervals, paired differences, plots (:mod:`report`).

    python benchmarks/causal_lm/run.py                    # everything (hours on 2 cores; background, niced)
    python benchmarks/causal_lm/run.py --stage base lora  # some stages
    python benchmarks/causal_lm/run.py --tiny             # the whole pipeline on a tiny random Llama (< 2 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_pipeline import Ctx, full_expert, lora_expert, scored, trainer  # noqa: E402

from lightning_merge import MergeCallback, MergeSearch, get_method, merge_models  # noqa: E402
from lightning_merge.examples.smollm2 import write_smollm2_base  # noqa: E402
from lightning_merge.examples.workflow import quiet_runtime  # noqa: E402

log = logging.getLogger("causal_lm")

TASKS = ("sentiment", "subjectivity", "topic", "supersense")
STAGES = ("base", "lora", "merges", "peft", "full", "search", "ddp", "sweep", "report")
MODES: dict[str, dict[str, Any]] = {
    "real": {"sizes": {"train": 2000, "val": 200, "test": 1000}, "topic_sizes": {"train": 800, "val": 200, "test": -1},
             "max_length": 48, "batch": 8, "eval_batch": 16, "lora_steps": 250, "lora_lr": 1e-3,
             "full_steps": 250, "full_lr": 5e-5, "full_layers": list(range(22, 30)), "ft_steps": 100, "ft_lr": 3e-5,
             "sweep_drops": [0.3, 0.5, 0.9]},
    "tiny": {"sizes": {"train": 96, "val": 16, "test": 48}, "max_length": 48, "batch": 8, "eval_batch": 16,
             "lora_steps": 24, "lora_lr": 1e-2, "full_steps": 24, "full_lr": 3e-3, "full_layers": [2, 3],
             "ft_steps": 4, "ft_lr": 1e-3, "sweep_drops": [0.5]},
}


def core_merges(p: float = 0.7) -> list[tuple[str, str, dict[str, Any]]]:
    """(family, method, params) of every family at drop rate ``p`` (keep fraction d = 1 − p).

    TIES-style families share drop -> elect -> disjoint mean at λ 1 (the DELLA paper's pipeline) and
    differ in the drop; task arithmetic at λ 0.4 (four experts) and λ 1; DPPA sums amplified deltas at
    λ 0.25; adaptive-RMS with both CV branches forced (pooled mean: threshold 1e9; own mean: 0);
    TSV-M and Iso-C with their papers' defaults."""
    d = round(1 - p, 4)
    return [
        ("task_arithmetic", "task_arithmetic", {"lambda": 0.4}),
        ("task_arithmetic", "task_arithmetic", {"lambda": 1.0}),
        ("ties", "ties", {"density": d, "lambda": 1.0}),
        ("dare_ties", "dare_ties", {"density": d, "lambda": 1.0, "normalize": True}),
        ("della", "della", {"density": d, "epsilon": 0.14, "lambda": 1.0}),
        ("adaptive_rms_pooled", "adaptive_rms", {"drop_rate": p, "cv_threshold": 1e9, "lambda": 1.0}),
        ("adaptive_rms_own", "adaptive_rms", {"drop_rate": p, "cv_threshold": 0.0, "lambda": 1.0}),
        ("dppa", "dppa", {"density_top": d, "density_band": min(1.0, round(d + 0.1, 4)), "lambda": 0.25}),
        ("tsv_m", "tsv_m", {}),
        ("iso_c", "iso_c", {}),
    ]


DROP_FAMILIES = ("ties", "dare_ties", "della", "adaptive_rms_pooled", "adaptive_rms_own", "dppa")
SEARCH = [{"method": "task_arithmetic", "lambda": 0.4}, {"method": "task_arithmetic", "lambda": 0.7},
          {"method": "task_arithmetic", "lambda": 1.0}, {"method": "ties", "density": 0.3, "lambda": 1.0},
          {"method": "dare_ties", "density": 0.3, "lambda": 1.0}, {"method": "della", "density": 0.3, "lambda": 1.0}]
PEFT_EXPORTS = [("ties", {"density": 0.3, "lambda": 1.0}, 16), ("task_arithmetic", {"lambda": 1.0}, 32)]
DDP_MERGE = ("dare_ties", {"density": 0.3, "lambda": 1.0, "normalize": True})


def merge_row(ctx: Ctx, regime: str, experts: list[str], family: str, method: str, params: dict[str, Any],
              drop: float | None, seed: int = 0) -> dict[str, Any]:
    return scored(ctx, kind="merge", regime=regime, name=method, params=params, seed=seed,
                  extra={"family": family, "drop": drop},
                  callbacks=[MergeCallback(experts, get_method(method, **params), target="model", seed=seed)])


def stage_base(ctx: Ctx) -> None:
    scored(ctx, kind="base", regime="-", name="base", params={})


def experts_of(ctx: Ctx, regime: str) -> list[str]:
    make = lora_expert if regime == "lora" else full_expert
    out = []
    for t in ctx.tasks:
        out.append(make(ctx, t))
        cb = [MergeCallback([out[-1]], "task_arithmetic", method_params={"lambda": 1.0}, target="model")]
        scored(ctx, kind="expert", regime=regime, name=t, params={}, extra={"task": t}, callbacks=cb)
    return out


def stage_merges(ctx: Ctx, regime: str) -> None:
    experts = experts_of(ctx, regime)
    for family, method, params in core_merges(0.7):
        merge_row(ctx, regime, experts, family, method, params, 0.7 if "density" in str(params) or
                  "drop_rate" in params else None)


def stage_peft(ctx: Ctx) -> None:
    from lightning_merge.errors import ConfigError

    experts = experts_of(ctx, "lora")
    for method, params, rank in PEFT_EXPORTS:
        out = ctx.work / "peft" / f"{method}_r{rank}"
        errors_file = out.with_name(out.name + ".errors.json")
        if not errors_file.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            report = merge_models(ctx.base, experts, get_method(method, **params), out=out, out_format="peft",
                                  adapter_rank=rank, overwrite=True)
            errors_file.write_text(json.dumps({str(k): float(v) for k, v in dict(report).items()}))
            ctx.store.timing(f"peft export {method} r{rank}", time.perf_counter() - t0)
        errs = list(json.loads(errors_file.read_text()).values())
        if not errs:
            raise ConfigError(f"{out}: the PEFT export reported no module")
        stats = {"modules": len(errs), "max": max(errs), "mean": sum(errs) / len(errs)}
        scored(ctx, kind="peft", regime="lora", name=method, params={**params, "adapter_rank": rank},
               extra={"reconstruction_error": stats, "dense": [method, params]},
               callbacks=[MergeCallback([str(out)], "task_arithmetic", method_params={"lambda": 1.0},
                                        target="model")])


def stage_search(ctx: Ctx) -> None:
    experts = experts_of(ctx, "lora")
    c = ctx.cfg
    k_ft = json.dumps(["search", c["ft_steps"]])
    done = ctx.store.data.setdefault("search", {})
    if k_ft not in done:
        t0 = time.perf_counter()
        pl_seed()
        search = MergeSearch(experts, candidates=SEARCH, monitor="val/acc_mean", target="model",
                             csv_path=str(ctx.work / "merge_search.csv"))
        module = ctx.module(finetune="full", lr=c["ft_lr"], train_layers=c["full_layers"])
        dm = ctx.datamodule(split="val", train_tasks=ctx.tasks)
        fit = trainer(callbacks=[search], max_steps=c["ft_steps"], val_check_interval=c["ft_steps"],
                      check_val_every_n_epoch=None)
        fit.fit(module, datamodule=dm)
        val_after = {t: module.outcomes[("val", t)] for t in ctx.tasks} if ("val", ctx.tasks[0]) in module.outcomes \
            else None
        t_fit = time.perf_counter() - t0
        tested = evaluate_module(ctx, module)
        done[k_ft] = {"best": search.best, "best_index": search.best_index, "best_score": search.best_score,
                      "scores": [r["score"] for r in search.results], "candidates": SEARCH,
                      "val_after_ft": None if val_after is None else
                      {t: sum(v[0] for v in rows.values()) / len(rows) for t, rows in val_after.items()},
                      "fit_seconds": round(t_fit, 1)}
        ctx.store.add(tested | {"key": json.dumps(["finetuned", c["ft_steps"]]), "kind": "finetuned",
                                "regime": "lora", "name": "searched+finetuned", "params": search.best,
                                "seed": 0, "split": "test"})
        ctx.store.timing(f"search ({len(SEARCH)} candidates) + fine-tune ({c['ft_steps']} steps)", t_fit)
    best = dict(done[k_ft]["best"])
    method = best.pop("method")
    scored(ctx, kind="searched", regime="lora", name=method, params=best,
           callbacks=[MergeCallback(experts, get_method(method, **best), target="model")])


def pl_seed() -> None:
    import lightning.pytorch as pl

    pl.seed_everything(0, workers=True, verbose=False)


def evaluate_module(ctx: Ctx, module: Any) -> dict[str, Any]:
    """Test scores of an already trained module (no callbacks), as a row body."""
    from lm_pipeline import outcomes_of

    t0 = time.perf_counter()
    trainer().test(module, datamodule=ctx.datamodule(split="test"), verbose=False)
    res = outcomes_of(module, "test", ctx.tasks)
    log.info("fine-tuned merge: %s", "  ".join(f"{t[:4]} {100 * r['acc']:.1f}" for t, r in res.items()))
    return {"acc": {t: r["acc"] for t, r in res.items()}, "n": {t: r["n"] for t, r in res.items()},
            "nll": {t: round(r["nll"], 4) for t, r in res.items()}, "bits": {t: r["bits"] for t, r in res.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def stage_ddp(ctx: Ctx, args: argparse.Namespace) -> None:
    experts = experts_of(ctx, "lora")
    method, params = DDP_MERGE
    ref = scored(ctx, kind="ddp_ref", regime="lora", name=method, params=params, split="val",
                 callbacks=[MergeCallback(experts, get_method(method, **params), target="model")])
    k = json.dumps(["ddp", method, params])
    if k in ctx.store.rows:
        return
    out = ctx.work / "ddp" / "outcomes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", ctx.mode, "--workdir", str(args.workdir),
           "--ddp-worker", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"DDP worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    got = json.loads(out.read_text())
    same_bits = all(got[t]["bits"] == ref["bits"][t] for t in ctx.tasks)
    nll_diff = max(abs(got[t]["nll"] - ref["nll"][t]) for t in ctx.tasks)
    ctx.store.add({"key": k, "kind": "ddp", "regime": "lora", "name": method, "params": params, "seed": 0,
                   "split": "val", "acc": {t: got[t]["acc"] for t in ctx.tasks},
                   "n": {t: got[t]["n"] for t in ctx.tasks},
                   "nll": {t: got[t]["nll"] for t in ctx.tasks}, "bits": {t: got[t]["bits"] for t in ctx.tasks},
                   "same_bits_as_1_process": same_bits, "max_nll_sum_diff": nll_diff,
                   "seconds": round(time.perf_counter() - t0, 1)})
    log.info("DDP (2 processes) vs 1 process: per-example outcomes %s, summed NLL differs by at most %.2e",
             "identical" if same_bits else "DIFFERENT", nll_diff)


def ddp_worker(ctx: Ctx, out: Path) -> None:
    """(Run by :func:`stage_ddp` in a subprocess; Lightning re-launches it on the second rank.)"""
    from lm_pipeline import outcomes_of

    method, params = DDP_MERGE
    experts = [str(ctx.work / "experts" / "lora" / t) for t in ctx.tasks]
    module = ctx.module()
    t = trainer(devices=2, strategy="ddp", callbacks=[MergeCallback(experts, get_method(method, **params),
                                                                     target="model")])
    t.test(module, datamodule=ctx.datamodule(split="val"), verbose=False)
    if t.global_rank == 0:
        out.write_text(json.dumps(outcomes_of(module, "test", ctx.tasks)))


def stage_sweep(ctx: Ctx) -> None:
    experts = experts_of(ctx, "lora")
    merge_row(ctx, "lora", experts, "dare_ties_norescale", "dare_ties",
              {"density": 0.3, "lambda": 1.0, "normalize": True, "rescale": "none"}, 0.7)
    for p in ctx.cfg["sweep_drops"]:
        for family, method, params in core_merges(p):
            if family in DROP_FAMILIES:
                merge_row(ctx, "lora", experts, family, method, params, p)


def setup(mode: str, workdir: Path) -> Ctx:
    from lightning_merge.examples.corpora import prepare

    cfg = MODES[mode]
    work = workdir / mode
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if mode == "tiny":
        from lm_tiny import write_base, write_data

        files = write_data(work / "data", cfg["sizes"])
        if not (base / "config.json").is_file():
            write_base(base)
    else:
        files = prepare(work / "data", list(TASKS), cfg["sizes"], task_sizes={"topic": cfg["topic_sizes"]})
        if not (base / "config.json").is_file():
            t0 = time.perf_counter()
            write_smollm2_base(base)
            log.info("base folder written (%.0f s)", time.perf_counter() - t0)
    return Ctx.open(mode, work, str(base), files, cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the whole pipeline on a tiny random Llama and tiny data")
    ap.add_argument("--mode", choices=sorted(MODES), default=None, help="(--tiny is --mode tiny)")
    ap.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "_data" / "causal_lm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mode = args.mode or ("tiny" if args.tiny else "real")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    quiet_runtime(args.threads)
    # upper-block experts hold only their trained tensors by design: the engine's "lacks tensors" warning is expected
    logging.getLogger("lightning_merge.engine").setLevel(logging.ERROR)
    ctx = setup(mode, args.workdir)
    if args.ddp_worker is not None:
        ddp_worker(ctx, args.ddp_worker)
        return 0
    import report

    runs = {"base": lambda: stage_base(ctx), "lora": lambda: experts_of(ctx, "lora"),
            "merges": lambda: stage_merges(ctx, "lora"), "peft": lambda: stage_peft(ctx),
            "full": lambda: stage_merges(ctx, "full"), "search": lambda: stage_search(ctx),
            "ddp": lambda: stage_ddp(ctx, args), "sweep": lambda: stage_sweep(ctx), "report": lambda: None}
    for stage in [s for s in STAGES if s in args.stage]:
        t0 = time.perf_counter()
        log.info("== stage %s", stage)
        runs[stage]()
        dt = time.perf_counter() - t0
        log.info("== stage %s done (%.0f s)", stage, dt)
        name = f"stage {stage} (all runs)"
        ctx.store.timing(name, ctx.store.data["timings"].get(name, 0.0) + dt)
        report.main(["--results", str(ctx.store.path)] + ([] if mode == "real" else ["--out", str(ctx.work)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
