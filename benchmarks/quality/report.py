"""Tables, paired tests of the papers' claims, and plots from a quality benchmark results file.

    python benchmarks/quality/report.py [--results benchmarks/quality/results.json [more.json ...]] [--out R.md]

Several results files (e.g. ``results.json`` from ``run.py`` and ``results_learned.json`` from
``learned.py``) are read as one: their rows are concatenated and their ``meta`` (tasks, split sizes,
base model) must agree. Writes ``--out`` (default: the first results file with suffix ``.md``) and
``<out stem>_<regime>_drop.png`` / ``_tasks.png`` beside it.

Statistics:

* accuracy of one evaluation on task t: p_t = correct / n_t; its standard error over test examples
  sqrt(p_t (1 - p_t) / n_t); the mean over T tasks has SE sqrt(sum_t SE_t^2) / T (tasks independent);
* normalised accuracy: mean over tasks of p_t / (the task's own expert's accuracy on t), in %;
* over seeds: the mean of the per-seed means, with a 95% t-interval over seeds (n >= 2);
* paired comparisons of two settings A and B: per test example, the fraction of A's seeds that got it
  right minus B's; 4000 bootstrap resamples of the test examples within each task (stratified), the
  statistic being the mean over tasks of the mean difference; a claim *holds* when the 95% interval
  is above 0, is *reversed* when below, else *not distinguishable* at this size;
* honest selection (two-fold cross-fitting over test examples): picking each family's best setting on
  the same examples it is then scored on flatters every family, the more the more settings it has.
  Each task's test examples are split in two fixed halves H1, H2; the setting with the best mean on H1
  is scored on H2 and the one best on H2 is scored on H1, so every example is scored by a setting
  chosen without it. The "held-out" columns and every claim about a family's *best* setting use these
  cross-fitted scores; the paired bootstrap then resamples the cross-fitted per-example outcomes.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
LABELS = {
    "soup": "soup (average)", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES",
    "dare_linear": "DARE-linear", "dare_ties_norescale": "DARE-TIES, no rescale", "della": "DELLA (row rank)",
    "della_layer": "DELLA (tensor rank)", "dppa": "DPPA", "adaptive_rms_pooled": "adaptive-RMS (CV<=50 branch)",
    "adaptive_rms_own": "adaptive-RMS (CV>50 branch)", "adamerging_layer": "AdaMerging (layer-wise)",
    "adamerging_task": "AdaMerging (task-wise)", "dam": "DAM",
}
#: the families whose coefficients are trained on data (``learned.py``); every other merge is static
LEARNED = ("adamerging_layer", "adamerging_task", "dam")
#: parameters left out of the setting labels (constant within a family)
UNLABELLED = ("normalize", "objective", "granularity", "data")


def unpack(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(s), dtype=np.uint8))[:n].astype(np.float64)


class Outcomes:
    """Per-example outcomes ``bits[t]`` (1 right, 0 wrong, or a fraction of seeds) on each task in ``tasks``."""

    bits: dict[str, np.ndarray]
    tasks: list[str]

    def acc(self, t: str) -> float:
        return float(self.bits[t].mean())

    @property
    def mean(self) -> float:
        return statistics.fmean(self.acc(t) for t in self.tasks)

    def normalized(self, own: dict[str, float]) -> float:
        return statistics.fmean(self.acc(t) / own[t] for t in self.tasks)

    def label(self) -> str:
        raise NotImplementedError


class Setting(Outcomes):
    """One merge configuration (or model) evaluated with one or more seeds."""

    def __init__(self, rows: list[dict[str, Any]], tasks: list[str]) -> None:
        self.rows, self.tasks = rows, tasks
        r0 = rows[0]
        self.regime, self.kind = r0["regime"], r0["kind"]
        self.family = r0.get("family", r0["name"] if r0["kind"] == "cli" else r0["kind"])
        self.params, self.drop = r0["params"], r0.get("drop")
        self.bits = {t: np.mean([unpack(r["bits"][t], r["n"][t]) for r in rows], axis=0) for t in tasks}

    @property
    def seeds(self) -> int:
        return len(self.rows)

    def per_seed_means(self) -> list[float]:
        return [statistics.fmean(r["acc"][t] for t in self.tasks) for r in self.rows]

    def ci_seeds(self, own: dict[str, float] | None = None) -> float | None:
        """95% t-interval half-width over seeds of the mean accuracy (normalized when ``own`` is given)."""
        if own is None:
            xs = self.per_seed_means()
        else:
            xs = [statistics.fmean(r["acc"][t] / own[t] for t in self.tasks) for r in self.rows]
        if len(xs) < 2:
            return None
        return T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))

    def ci_examples(self) -> float:
        se2 = sum(self.acc(t) * (1 - self.acc(t)) / len(self.bits[t]) for t in self.tasks)
        return 1.96 * math.sqrt(se2) / len(self.tasks)

    def label(self) -> str:
        p = {k: v for k, v in self.params.items() if k not in UNLABELLED}
        return f"{LABELS.get(self.family, self.family)} " + ", ".join(f"{k}={v}" for k, v in p.items())


class Picked(Outcomes):
    """A family's setting selected by two-fold cross-fitting (see the module docstring).

    ``bits[t][i]`` is the outcome on example i of task t of the setting chosen on the *other* half.
    """

    def __init__(self, candidates: list[Setting], tasks: list[str], folds: dict[str, list[np.ndarray]]) -> None:
        if not candidates:
            raise ValueError("Picked needs at least one candidate setting")
        self.tasks, self.family, self.drop = tasks, candidates[0].family, candidates[0].drop
        self.bits = {t: np.zeros_like(candidates[0].bits[t]) for t in tasks}
        self.picks: list[Setting] = []
        for choose, score in ((0, 1), (1, 0)):
            pick = max(candidates, key=lambda s: statistics.fmean(s.bits[t][folds[t][choose]].mean() for t in tasks))
            self.picks.append(pick)
            for t in tasks:
                self.bits[t][folds[t][score]] = pick.bits[t][folds[t][score]]

    def label(self) -> str:
        a, b = (p.label() for p in self.picks)
        return a if a == b else f"{a} (H1) / {b} (H2)"


def folds(settings: list[Setting], tasks: list[str], seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Each task's test example indices split into two fixed random halves (the same for every setting)."""
    out = {}
    for i, t in enumerate(tasks):
        perm = np.random.default_rng([seed, i]).permutation(len(settings[0].bits[t]))
        out[t] = [np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])]
    return out


class Subset(Outcomes):
    """The outcomes of a setting on a subset of each task's test examples (``idx[t]``)."""

    def __init__(self, setting: Setting, idx: dict[str, np.ndarray]) -> None:
        self.setting, self.tasks = setting, list(idx)
        self.bits = {t: setting.bits[t][i] for t, i in idx.items()}

    def label(self) -> str:
        return self.setting.label()


#: the families whose preferred drop rates are compared (the seed papers' methods)
DROP_FAMILIES = ("ties", "dare_ties", "della", "dppa", "adaptive_rms_pooled")


def drop_table(merges: list[Setting], tasks: list[str], fold: dict[str, list[np.ndarray]]) -> list[str]:
    """"The best drop rate differs by method", tested without selection bias: each family's best drop
    rate (and its best setting at every drop rate, e.g. over λ) is chosen on half H1 of the test
    examples; on H2, family A at its rate p_A is compared with A at B's rate p_B, and B at p_B with B
    at p_A. The rates differ for the pair when both comparisons hold."""
    h1 = {t: fold[t][0] for t in tasks}
    h2 = {t: fold[t][1] for t in tasks}
    on_h1 = {s: Subset(s, h1).mean for s in merges if s.family in DROP_FAMILIES and s.drop is not None}
    at: dict[str, dict[float, Setting]] = defaultdict(dict)
    for s, score in on_h1.items():
        cur = at[s.family].get(s.drop)
        if cur is None or score > on_h1[cur]:
            at[s.family][s.drop] = s
    pref = {f: max(d, key=lambda q, f=f: on_h1[at[f][q]]) for f, d in at.items() if len(d) >= 3}
    fams = [f for f in DROP_FAMILIES if f in pref]
    lines = ["### Does the best drop rate differ by method? (chosen on H1, tested on H2, paired bootstrap 95%)", "",
             "| A (rate chosen on H1) | B | A at p_A − A at p_B | B at p_B − B at p_A | rates differ |",
             "|---|---|---|---|---|"]
    for i, fa in enumerate(fams):
        for fb in fams[i + 1:]:
            pa, pb = pref[fa], pref[fb]
            if pa == pb:
                lines.append(f"| {LABELS[fa]} ({pa}) | {LABELS[fb]} ({pb}) | – | – | no: same rate on H1 |")
                continue
            if pb not in at[fa] or pa not in at[fb]:
                lines.append(f"| {LABELS[fa]} ({pa}) | {LABELS[fb]} ({pb}) | – | – | not compared: rate not run |")
                continue
            da, la, ha = paired(Subset(at[fa][pa], h2), Subset(at[fa][pb], h2), tasks)
            db, lb, hb = paired(Subset(at[fb][pb], h2), Subset(at[fb][pa], h2), tasks)
            ok = "yes" if la > 0 and lb > 0 else "not shown"
            lines.append(f"| {LABELS[fa]} ({pa}) | {LABELS[fb]} ({pb}) | {100 * da:+.2f} [{100 * la:+.2f}, "
                         f"{100 * ha:+.2f}] | {100 * db:+.2f} [{100 * lb:+.2f}, {100 * hb:+.2f}] | {ok} |")
    return [*lines, ""]


def paired(a: Outcomes, b: Outcomes, tasks: list[str], n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean-over-tasks difference A - B, 95% bootstrap interval), resampling test examples per task."""
    rng = np.random.default_rng(seed)
    diffs = {t: a.bits[t] - b.bits[t] for t in tasks}
    point = float(np.mean([d.mean() for d in diffs.values()]))
    boot = np.zeros(n_boot)
    for d in diffs.values():
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boot += d[idx].mean(1)
    boot /= len(tasks)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return point, float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    return "holds" if lo > 0 else ("reversed" if hi < 0 else "not distinguishable")


def load(paths: list[Path]) -> tuple[dict[str, Any], list[Setting]]:
    """The settings of the rows of every file in ``paths`` (their ``meta`` must be equal)."""
    meta: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text())
        if meta is not None and data["meta"] != meta:
            raise SystemExit(f"{path}: its meta {data['meta']} differs from {paths[0]}'s {meta}; the files are "
                             "not from the same benchmark settings")
        meta = data["meta"]
        rows += data["rows"]
    assert meta is not None
    tasks = meta["tasks"]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        k = json.dumps([r["regime"], r["kind"], r["name"], r["params"], r.get("family")], sort_keys=True)
        if all(r["key"] != o["key"] for o in groups[k]):  # a row present in two files counts once
            groups[k].append(r)
    return meta, [Setting(g, tasks) for g in groups.values()]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _shown(path: Path) -> str:
    return f"`{path.relative_to(HERE.parents[1]) if path.is_relative_to(HERE.parents[1]) else path}`"


def report(paths: list[Path], out: Path) -> str:
    """The markdown report of the results files ``paths``; plots are written beside ``out``."""
    meta, settings = load(paths)
    tasks = meta["tasks"]
    base = next((s for s in settings if s.kind == "base"), None)
    if base is None:
        raise SystemExit(f"no base-model row in {[str(p) for p in paths]}; pass run.py's results file too")
    lines = [f"# Quality benchmark ({meta['mode']}): all-MiniLM-L6-v2, {len(tasks)} tasks",
             "", "Results: " + ", ".join(_shown(p) for p in paths) + "; "
             "test examples per task: " + ", ".join(f"{t} {len(base.bits[t])}" for t in tasks) + ".", ""]
    for cli in (s for s in settings if s.kind == "cli"):
        twin = next((s for s in settings if s.kind == "merge" and s.regime == cli.regime
                     and s.rows[0]["name"] == cli.rows[0]["name"] and s.params == cli.params), None)
        same = twin is not None and twin.rows[0]["bits"] == cli.rows[0]["bits"]
        command = cli.rows[0].get("command", "merge").replace(f"{HERE.parents[1]}/", "")
        lines += [f"Command-line check: `lightning-merge {command}` wrote "
                  f"{cli.label().strip()} as an HF folder; scored on the {cli.regime} regime's test sets its "
                  f"per-example outcomes are {'identical to' if same else 'DIFFERENT from'} the MergeCallback "
                  f"merge's (mean {pct(cli.mean)}).", ""]
    regimes = [r for r in ("full", "lora") if any(s.regime == r for s in settings)]
    for regime in regimes:
        experts = {s.rows[0]["task"]: s for s in settings if s.regime == regime and s.kind == "expert"}
        own = {t: experts[t].acc(t) for t in tasks if t in experts}
        if len(own) < len(tasks):
            continue
        merges = [s for s in settings if s.regime == regime and s.kind == "merge"]
        lines += [f"## Regime: {regime}", "", "### Experts against the base (test accuracy, %)", "",
                  "| task | base | expert on its task | gain | 95% CI of the gain (paired bootstrap) |",
                  "|---|---|---|---|---|"]
        for t in tasks:
            d, lo, hi = paired(experts[t], base, [t])
            lines.append(f"| {t} | {pct(base.acc(t))} | {pct(own[t])} | {100 * d:+.1f} | "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}] |")
        lines += ["", "### Every model and merge (test accuracy %, mean over seeds)", "",
                  "| model | seeds | " + " | ".join(tasks) + " | mean ± CI(examples) | ± CI(seeds) | normalized |",
                  "|" + "---|" * (len(tasks) + 5)]
        rows = [base, *[experts[t] for t in tasks], *sorted(merges, key=lambda s: (s.family, s.drop or 0, s.label()))]
        for s in rows:
            name = "base" if s.kind == "base" else (f"expert: {s.rows[0]['task']}" if s.kind == "expert" else s.label())
            ci_s = s.ci_seeds()
            seeds_ci = "± " + pct(ci_s) if ci_s is not None else "–"
            lines.append(f"| {name} | {s.seeds} | " + " | ".join(pct(s.acc(t)) for t in tasks)
                         + f" | {pct(s.mean)} ± {pct(s.ci_examples())} | {seeds_ci} | {pct(s.normalized(own))} |")
        best = best_by_family(merges)
        fold = folds(merges, tasks)
        picked = {f: Picked([s for s in merges if s.family == f], tasks, fold) for f in best}
        lines += ["", "### Best setting of each family", "",
                  "In-sample: the setting with the best mean on all test examples (flattering). Held out: "
                  "chosen on one half of each task's test examples, scored on the other, both ways "
                  "(see report.py).", "",
                  "| family | settings | best setting (in-sample) | mean | held-out mean | held-out normalized | "
                  "chosen on H1 / on H2 |", "|---|---|---|---|---|---|---|"]
        for fam, s in sorted(best.items(), key=lambda kv: -picked[kv[0]].mean):
            n = sum(m.family == fam for m in merges)
            lines.append(f"| {LABELS.get(fam, fam)} | {n} | {s.label()} | {pct(s.mean)} | {pct(picked[fam].mean)} | "
                         f"{pct(picked[fam].normalized(own))} | {picked[fam].label()} |")
        lines += ["", "### The papers' claims at this scale (paired bootstrap over test examples, 95%)", "",
                  "A family's *best* setting is its held-out selection; fixed settings are compared as they are.",
                  "", "| claim | A | B | A − B (points) | 95% CI | verdict |", "|---|---|---|---|---|---|"]
        for claim, a, b in claims(merges, tasks, fold):
            d, lo, hi = paired(a, b, tasks)
            lines.append(f"| {claim} | {a.label()} | {b.label()} | {100 * d:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                         f"| {verdict(lo, hi)} |")
        lines += ["", "Best drop rate per family (in-sample): " + "; ".join(
            f"{LABELS.get(f, f)} {s.drop}" for f, s in sorted(best.items()) if s.drop is not None), ""]
        lines += drop_table(merges, tasks, fold)
        stem = out.with_suffix("")
        plot_drop(merges, own, stem.with_name(f"{stem.name}_{regime}_drop.png"), regime)
        plot_tasks(base, experts, best, tasks, stem.with_name(f"{stem.name}_{regime}_tasks.png"), regime)
        lines += [f"![score against drop rate]({stem.name}_{regime}_drop.png)",
                  f"![per-task accuracy]({stem.name}_{regime}_tasks.png)", ""]
    return "\n".join(lines)


def best_by_family(merges: list[Setting]) -> dict[str, Setting]:
    best: dict[str, Setting] = {}
    for s in merges:
        if s.family not in best or s.mean > best[s.family].mean:
            best[s.family] = s
    return best


def best_per_drop(merges: list[Setting]) -> dict[tuple[str, float], Setting]:
    """The best setting (by mean accuracy) of each (family, drop rate): e.g. over lambda."""
    best: dict[tuple[str, float], Setting] = {}
    for s in merges:
        if s.drop is not None and ((s.family, s.drop) not in best or s.mean > best[(s.family, s.drop)].mean):
            best[(s.family, s.drop)] = s
    return best


def claims(merges: list[Setting], tasks: list[str],
           fold: dict[str, list[np.ndarray]]) -> list[tuple[str, Outcomes, Outcomes]]:
    """(claim, A, B) pairs; a family's or a group's best setting is selected by cross-fitting (``Picked``)."""
    def pick(keep: Any) -> Picked | None:
        cands = [s for s in merges if keep(s)]
        return Picked(cands, tasks, fold) if cands else None

    out: list[tuple[str, Outcomes, Outcomes]] = []
    della = pick(lambda s: s.family == "della")
    for fam, claim in (("ties", "DELLA beats TIES (paper: +3.6)"), ("dare_ties", "DELLA beats DARE (paper: +1.2)"),
                       ("task_arithmetic", "DELLA beats task arithmetic (paper: +11.1)")):
        other = pick(lambda s, f=fam: s.family == f)
        if della is not None and other is not None:
            out.append((claim, della, other))
    for p in (0.5, 0.7, 0.9):  # the same drop rate: MagPrune's magnitude-aware drop against a uniform one
        for fam, name in (("dare_ties", "DARE-TIES"), ("ties", "TIES")):
            a = pick(lambda s, q=p: s.family == "della" and s.drop == q)
            b = pick(lambda s, f=fam, q=p: s.family == f and s.drop == q)
            if a is not None and b is not None:
                out.append((f"DELLA beats {name} at the same drop rate p={p}", a, b))
    # the same lambda on both sides: these claims are about the drop rule / the rescale, not lambda
    same = {(s.family, s.drop, s.params.get("lambda")): s for s in merges}
    for branch in ("adaptive_rms_pooled", "adaptive_rms_own"):
        for p in (0.7, 0.9):
            for lam in (1.0, 0.5):
                a, b = same.get((branch, p, lam)), same.get(("dare_ties", p, lam))
                if a is not None and b is not None:
                    out.append((f"adaptive-RMS beats fixed-rate DARE-TIES at p={p} (both λ={lam:g})", a, b))
    for p in (0.3, 0.5, 0.7):
        a, b = same.get(("dare_ties", p, 1.0)), same.get(("dare_ties_norescale", p, 1.0))
        if a is not None and b is not None:
            out.append((f"rescaling matters (DARE-TIES with vs without 1/(1-p)), p={p}, both λ=1", a, b))
    adaptive = pick(lambda s: s.family.startswith("adaptive_rms"))
    dare = pick(lambda s: s.family == "dare_ties")
    if adaptive is not None and dare is not None:
        out.append(("adaptive-RMS (best setting) beats DARE-TIES (best setting)", adaptive, dare))
    ada, ta = pick(lambda s: s.family == "adamerging_layer"), pick(lambda s: s.family == "task_arithmetic")
    if ada is not None and ta is not None:
        out.append(("layer-wise AdaMerging beats task arithmetic (paper, ViT-B/32, 8 tasks: +11.0)", ada, ta))
    learned, static = pick(lambda s: s.family in LEARNED), pick(lambda s: s.family not in LEARNED)
    if learned is not None and static is not None:
        out.append(("the best learned merge beats the best static merge", learned, static))
    return out


def plot_drop(merges: list[Setting], own: dict[str, float], path: Path, regime: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    best = best_per_drop(merges)
    for fam in sorted({f for f, _ in best}):
        pts = sorted((d, 100 * s.normalized(own), 100 * (s.ci_seeds(own) or 0.0))
                     for (f, d), s in best.items() if f == fam)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS.get(fam, fam))
    ax.set_xlabel("drop rate p = 1 − density")
    ax.set_ylabel("normalized accuracy (% of each expert)")
    ax.set_title(f"score against drop rate ({regime} fine-tunes; bars: 95% CI over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_tasks(base: Setting, experts: dict[str, Setting], best: dict[str, Setting], tasks: list[str], path: Path,
               regime: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("base", {t: base.acc(t) for t in tasks}), ("own expert", {t: experts[t].acc(t) for t in tasks})]
    ranked = sorted(best.items(), key=lambda kv: -kv[1].mean)
    bars += [(LABELS.get(f, f), {t: s.acc(t) for t in tasks}) for f, s in ranked]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / len(bars)
    for i, (name, acc) in enumerate(bars):
        ax.bar([j + (i - len(bars) / 2) * w for j in range(len(tasks))], [100 * acc[t] for t in tasks], w, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(max(0, 100 * min(min(a.values()) for _, a in bars) - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"per task: base, own expert, best setting of each merge family ({regime})")
    ax.legend(fontsize=7, ncol=3)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from lightning_merge.targets.atomic import atomic_file

    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, nargs="+", default=[HERE / "results.json"],
                    help="one or more results files (rows concatenated; their meta must agree)")
    ap.add_argument("--out", type=Path, default=None, help="the report (default: the first results file's .md)")
    args = ap.parse_args(argv)
    out = args.out or args.results[0].with_suffix(".md")
    text = report(args.results, out)
    out.write_text(text + "\n")
    print(text)  # noqa: T201 - a script's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
