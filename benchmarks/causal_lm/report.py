"""Tables, claims and plots of the causal-LM benchmark from its ``results.json``.

Intervals: per task, the Wilson 95% interval of an accuracy; for the mean over tasks, ±1.96 times
the standard error sqrt(Σ_t p_t(1−p_t)/n_t)/T. Claims compare two models *paired* on the same test
examples: the difference of mean accuracy (over tasks, or on one task) with a 95% bootstrap interval
(examples resampled within each task, 2000 draws, seed 0). A claim "holds" when the interval is
above 0, is "reversed" below 0, else "not resolved" at this test size.

    python benchmarks/causal_lm/report.py [--results benchmarks/_data/causal_lm/real/results.json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lm_pipeline import unpack  # noqa: E402

Row = dict[str, Any]


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


def bits(row: Row, task: str) -> np.ndarray:
    return unpack(row["bits"][task], row["n"][task])


def mean_ci(row: Row, tasks: list[str]) -> tuple[float, float]:
    ps = [row["acc"][t] for t in tasks]
    se = math.sqrt(sum(p * (1 - p) / row["n"][t] for p, t in zip(ps, tasks))) / len(tasks)
    return float(np.mean(ps)), 1.96 * se


def paired(a: Row, b: Row, tasks: list[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean over ``tasks`` of acc(a) − acc(b), 95% bootstrap interval), paired on the examples."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    diff = 0.0
    for t in tasks:
        d = bits(a, t).astype(np.int8) - bits(b, t).astype(np.int8)
        diff += d.mean()
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        total += d[idx].mean(axis=1)
    total /= len(tasks)
    lo, hi = np.percentile(total, [2.5, 97.5])
    return diff / len(tasks), float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    return "holds" if lo > 0 else ("reversed" if hi < 0 else "not resolved")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def label(r: Row) -> str:
    p = {k: v for k, v in r["params"].items() if k not in ("normalize",)}
    shown = ", ".join(f"{k.replace('lambda', 'λ').replace('density', 'd')} {v:g}" if isinstance(v, float) else
                      f"{k} {v}" for k, v in p.items() if k != "cv_threshold")
    name = r.get("family", r["name"]) if r["kind"] == "merge" else r["name"]
    return f"{name} ({shown})" if shown else name


def load(path: Path) -> tuple[dict[str, Any], list[Row]]:
    data = json.loads(path.read_text())
    return data, data["rows"]


def table(rows: list[Row], tasks: list[str]) -> list[str]:
    out = ["| model | " + " | ".join(tasks) + " | mean ± 95% |", "|---|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        cells = []
        for t in tasks:
            lo, hi = wilson(r["acc"][t], r["n"][t])
            cells.append(f"{pct(r['acc'][t])} [{pct(lo)}, {pct(hi)}]")
        m, h = mean_ci(r, tasks)
        out.append(f"| {r['kind']} {r['regime'] if r['regime'] != '-' else ''} {label(r)} | " + " | ".join(cells)
                   + f" | **{pct(m)}** ± {pct(h)} |")
    return out


def claim(lines: list[str], text: str, a: Row | None, b: Row | None, tasks: list[str]) -> None:
    if a is None or b is None:
        lines.append(f"| {text} | – | – | not run yet |")
        return
    d, lo, hi = paired(a, b, tasks)
    lines.append(f"| {text} | {100 * d:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {verdict(lo, hi)} |")


def find(rows: list[Row], kind: str, regime: str, family: str | None = None, drop: float | None = None,
         **params: Any) -> Row | None:
    for r in rows:
        if r["kind"] != kind or r["regime"] != regime or r["split"] != "test":
            continue
        if family is not None and r.get("family", r["name"]) != family:
            continue
        if drop is not None and r.get("drop") != drop:
            continue
        if all(r["params"].get(k) == v for k, v in params.items()):
            return r
    return None


def report(path: Path, out: Path) -> str:
    data, rows = load(path)
    meta = data["meta"]
    tasks = meta["tasks"]
    test = [r for r in rows if r["split"] == "test"]
    base = find(rows, "base", "-")
    lines = [f"# Causal-LM benchmark ({meta['mode']} mode)", "",
             f"Results file `{path.name}`: {len(rows)} rows. Test examples per task: "
             + ", ".join(f"{t} {meta['sizes'][t]['test']}" for t in tasks) + ". Label words: "
             + "; ".join(f"{t}: {'/'.join(w.strip() for w in meta['label_words'][t])}" for t in tasks)
             + ". Every label word a single token (so first-token score = full label-word log-likelihood): "
             + str(all(meta["single_token_labels"].values())) + ".", "",
             "## Accuracy (%), Wilson 95% intervals per task", ""]
    order = {"base": 0, "expert": 1, "merge": 2, "peft": 3, "searched": 4, "finetuned": 5}
    lines += table(sorted(test, key=lambda r: (r["regime"] != "lora", order.get(r["kind"], 9))), tasks)
    lines += ["", "## Claims (paired differences of accuracy, points, 95% bootstrap interval)", "",
              "| claim | diff | 95% | verdict |", "|---|---|---|---|"]
    for regime in ("lora", "full"):
        for t in tasks:
            e = find(rows, "expert", regime, t)
            claim(lines, f"{regime} expert {t} beats the base on {t}", e, base, [t])
    for regime in ("lora", "full"):
        ties, dare = find(rows, "merge", regime, "ties", 0.7), find(rows, "merge", regime, "dare_ties", 0.7)
        della = find(rows, "merge", regime, "della", 0.7)
        ta = max((r for r in test if r["kind"] == "merge" and r["regime"] == regime and r["name"] == "task_arithmetic"),
                 key=lambda r: mean_ci(r, tasks)[0], default=None)
        claim(lines, f"{regime}: DELLA beats DARE-TIES (p 0.7), mean of tasks", della, dare, tasks)
        claim(lines, f"{regime}: DELLA beats TIES (p 0.7)", della, ties, tasks)
        claim(lines, f"{regime}: DELLA beats the best task arithmetic", della, ta, tasks)
        for br in ("adaptive_rms_pooled", "adaptive_rms_own"):
            claim(lines, f"{regime}: {br} beats DARE-TIES (p 0.7)", find(rows, "merge", regime, br, 0.7), dare, tasks)
        claim(lines, f"{regime}: TIES beats the best task arithmetic", ties, ta, tasks)
        claim(lines, f"{regime}: the best task arithmetic beats the base", ta, base, tasks)
    claim(lines, "lora: DARE-TIES rescale 1/(1−p) beats no rescale (p 0.7)",
          find(rows, "merge", "lora", "dare_ties", 0.7), find(rows, "merge", "lora", "dare_ties_norescale", 0.7), tasks)
    searched, tuned = find(rows, "searched", "lora"), find(rows, "finetuned", "lora")
    claim(lines, "fine-tuning the searched merge improves it", tuned, searched, tasks)
    claim(lines, "the searched merge beats the base", searched, base, tasks)
    lines += ["", "## LoRA experts merged to a LoRA adapter (`out_format=\"peft\"`)", "",
              "| export | rank | modules | max rel. error | mean rel. error | agreement with the dense merge |",
              "|---|---|---|---|---|---|"]
    for r in (r for r in test if r["kind"] == "peft"):
        method, params = r["dense"]
        dense = next((d for d in test if d["kind"] == "merge" and d["regime"] == "lora" and d["name"] == method
                      and d["params"] == params), None)
        agree = "–" if dense is None else pct(float(np.mean(np.concatenate(
            [bits(r, t) == bits(dense, t) for t in tasks])))) + "%"
        e = r["reconstruction_error"]
        lines.append(f"| {method} | {r['params']['adapter_rank']} | {e['modules']} | {e['max']:.3g} | {e['mean']:.3g} "
                     f"| {agree} |")
    ddp = next((r for r in rows if r["kind"] == "ddp"), None)
    lines += ["", "## 2-process DDP against 1 process", ""]
    lines.append("not run yet" if ddp is None else
                 f"{label(ddp)} on the validation splits: per-example outcomes "
                 f"{'identical' if ddp['same_bits_as_1_process'] else 'DIFFERENT'}; summed −log p(true word) "
                 f"differs by at most {ddp['max_nll_sum_diff']:.2e} per task.")
    search = next(iter(data.get("search", {}).values()), None)
    if search:
        lines += ["", "## MergeSearch (validation mean accuracy per candidate)", ""]
        lines += [f"- {json.dumps(c)}: {pct(s)}" for c, s in zip(search["candidates"], search["scores"])]
        lines.append(f"- chosen: {json.dumps(search['best'])}; validation after the fine-tune: "
                     f"{search['val_after_ft']}")
    lines += ["", "## Timings on this machine (s)", ""]
    lines += [f"- {k}: {v}" for k, v in data.get("timings", {}).items()]
    per_eval = [r["seconds"] for r in rows if r["kind"] in ("base", "expert", "merge")]
    if per_eval:
        lines.append(f"- one scoring of every test split (median over {len(per_eval)}): {np.median(per_eval):.0f}")
    plots(rows, tasks, base, out, path.stem)
    text = "\n".join(lines) + "\n"
    (out / f"{path.stem}.md").write_text(text)
    return text


def plots(rows: list[Row], tasks: list[str], base: Row | None, out: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merges = [r for r in rows if r["kind"] == "merge" and r["regime"] == "lora" and r.get("drop") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam in sorted({r["family"] for r in merges}):
        pts = sorted((r["drop"], mean_ci(r, tasks)[0]) for r in merges if r["family"] == fam)
        ax.plot([p for p, _ in pts], [100 * m for _, m in pts], marker="o", label=fam)
    if base is not None:
        ax.axhline(100 * mean_ci(base, tasks)[0], color="grey", ls="--", label="base")
    ax.set(xlabel="drop rate p", ylabel="mean accuracy over tasks (%)", title="LoRA experts merged: score vs drop")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_drop.png", dpi=80)
    plt.close(fig)
    shown = [r for r in [base] + [r for r in rows if r["kind"] in ("searched", "finetuned")] if r is not None]
    best = max((r for r in rows if r["kind"] == "merge" and r["split"] == "test"), key=lambda r: mean_ci(r, tasks)[0],
               default=None)
    if best is not None:
        shown.append(best)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(shown) + 1)
    x = np.arange(len(tasks))
    own = [next((r["acc"][t] for r in rows if r["kind"] == "expert" and r["regime"] == "lora" and r["name"] == t),
                math.nan) for t in tasks]
    ax.bar(x, [100 * v for v in own], width, label="own LoRA expert")
    for i, r in enumerate(shown, 1):
        ax.bar(x + i * width, [100 * r["acc"][t] for t in tasks], width, label=f"{r['kind']} {label(r)}"[:40])
    ax.set_xticks(x + 0.4 - width / 2, tasks)
    ax.set(ylabel="accuracy (%)", title="per task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_tasks.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=HERE.parents[0] / "_data" / "causal_lm" / "real" / "results.json")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report(args.results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
