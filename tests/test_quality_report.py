"""The quality benchmark's statistics (benchmarks/quality/report.py) on synthetic per-example outcomes:
paired bootstrap, duplicate rows, held-out (cross-fitted) selection and its bias, the report end to end."""

from __future__ import annotations

import base64
import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality_report", ROOT / "benchmarks" / "quality" / "report.py")
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

TASKS = ["a", "b"]


def _pack(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(bits.astype(np.uint8)).tobytes()).decode()


def _row(kind: str, name: str, bits: dict[str, np.ndarray], *, family: str | None = None, params=None, seed=0,
         regime: str = "full", task: str | None = None, drop=None) -> dict:
    params = params or {}
    row = {"key": json.dumps([regime, kind, name, params, seed], sort_keys=True), "regime": regime, "kind": kind,
           "name": name, "params": params, "seed": seed, "acc": {t: float(b.mean()) for t, b in bits.items()},
           "n": {t: len(b) for t, b in bits.items()}, "bits": {t: _pack(b) for t, b in bits.items()}}
    if family is not None:
        row.update(family=family, drop=drop)
    if task is not None:
        row["task"] = task
    return row


def _setting(bits: dict[str, np.ndarray], **kw) -> report.Setting:
    return report.Setting([_row("merge", "m", bits, family=kw.pop("family", "f"), **kw)], TASKS)


def test_paired_difference_and_interval():
    rng = np.random.default_rng(0)
    b = {t: (rng.random(400) < 0.6).astype(float) for t in TASKS}
    same = report.paired(_setting(b), _setting(b), TASKS)
    assert same == (0.0, 0.0, 0.0)
    better = {t: np.ones(400) for t in TASKS}
    d, lo, hi = report.paired(_setting(better), _setting(b), TASKS)
    assert d == pytest.approx(1 - statistics.fmean(b[t].mean() for t in TASKS))
    assert lo < d < hi and hi - lo < 0.12  # SE of the mean of 800 Bernoulli(0.4) ~ 0.017
    assert report.verdict(lo, hi) == "holds" and report.verdict(-hi, -lo) == "reversed"
    assert report.verdict(-0.1, 0.1) == "not distinguishable"


def test_picked_scores_each_half_with_the_setting_chosen_on_the_other():
    n = 10
    base = {t: np.zeros(n) for t in TASKS}
    probe = report.Setting([_row("merge", "x", base, family="f")], TASKS)
    fold = report.folds([probe], TASKS)
    h1, h2 = ({t: fold[t][i] for t in TASKS} for i in (0, 1))
    assert all(len(np.intersect1d(h1[t], h2[t])) == 0 and len(h1[t]) + len(h2[t]) == n for t in TASKS)
    a_bits = {t: np.zeros(n) for t in TASKS}  # A: right on all of H1 only
    b_bits = {t: np.zeros(n) for t in TASKS}  # B: right on one example of H2 only
    for t in TASKS:
        a_bits[t][h1[t]] = 1
        b_bits[t][h2[t][0]] = 1
    a = _setting(a_bits, params={"k": "A"})
    b = _setting(b_bits, params={"k": "B"})
    picked = report.Picked([a, b], TASKS, fold)
    assert [p.params["k"] for p in picked.picks] == ["A", "B"]  # A is best on H1, B on H2
    for t in TASKS:  # H2 scored by A (chosen on H1): all wrong; H1 scored by B (chosen on H2): all wrong
        np.testing.assert_array_equal(picked.bits[t], np.zeros(n))
    assert picked.mean == 0.0 and max(a.mean, b.mean) == 0.5
    assert "(H1)" in picked.label() and "(H2)" in picked.label()


def test_in_sample_selection_is_biased_and_held_out_selection_is_not():
    """Ten settings of identical true accuracy 0.8: the in-sample best overstates it by ~1.5 standard
    errors on average (the expected maximum of 10 normals); the cross-fitted pick does not."""
    rng = np.random.default_rng(1)
    n, true, reps = 500, 0.8, 40
    se = (true * (1 - true) / (n * len(TASKS))) ** 0.5
    in_sample, held_out = [], []
    for _ in range(reps):
        cands = [_setting({t: (rng.random(n) < true).astype(float) for t in TASKS}, params={"i": i})
                 for i in range(10)]
        fold = report.folds(cands, TASKS, seed=int(rng.integers(1 << 30)))
        in_sample.append((max(c.mean for c in cands) - true) / se)
        held_out.append((report.Picked(cands, TASKS, fold).mean - true) / se)
    # averages over 40 replications: SE of each average <= 1/sqrt(40) ~ 0.16 standard errors
    assert statistics.fmean(in_sample) > 1.0
    assert abs(statistics.fmean(held_out)) < 0.5


def _results(tmp_path: Path, name: str, rows: list[dict], meta: dict | None = None) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"meta": meta or {"mode": "full", "tasks": TASKS}, "rows": rows}))
    return path


def _bench_rows(rng: np.random.Generator) -> list[dict]:
    n = 300
    draw = lambda p: {t: (rng.random(n) < p).astype(float) for t in TASKS}  # noqa: E731
    rows = [_row("base", "base", draw(0.6), regime="-")]
    rows += [_row("expert", t, draw(0.7), task=t) for t in TASKS]
    rows += [_row("merge", "task_arithmetic", draw(0.65), family="task_arithmetic", params={"lambda": lam})
             for lam in (0.3, 1.0)]
    for p in (0.5, 0.7, 0.9):
        d = round(1 - p, 4)
        rows.append(_row("merge", "ties", draw(0.66), family="ties", params={"density": d, "lambda": 1.0}, drop=p))
        for seed in (0, 1):
            for fam in ("della", "dare_ties"):
                rows.append(_row("merge", fam, draw(0.66), family=fam, params={"density": d, "lambda": 1.0},
                                 drop=p, seed=seed))
    return rows


def test_load_counts_a_row_in_two_files_once_and_refuses_other_settings(tmp_path):
    rows = _bench_rows(np.random.default_rng(2))
    first = _results(tmp_path, "r1.json", rows)
    second = _results(tmp_path, "r2.json", rows[-4:])  # the same rows again
    _, settings = report.load([first, second])
    assert sum(s.seeds for s in settings) == len(rows)
    assert max(s.seeds for s in settings) == 2
    other = _results(tmp_path, "r3.json", rows, meta={"mode": "quick", "tasks": TASKS})
    with pytest.raises(SystemExit, match="r3.json"):
        report.load([first, other])


def test_report_has_held_out_selection_claims_and_plots(tmp_path):
    path = _results(tmp_path, "results.json", _bench_rows(np.random.default_rng(3)))
    assert report.main(["--results", str(path)]) == 0
    text = path.with_suffix(".md").read_text()
    assert "held-out mean" in text and "DELLA beats TIES (paper: +3.6)" in text
    assert "DELLA beats DARE-TIES at the same drop rate p=0.9" in text
    for suffix in ("drop", "tasks"):
        assert (tmp_path / f"results_full_{suffix}.png").stat().st_size > 5_000


def test_drop_table_finds_rates_that_differ_only_when_they_do():
    """TIES truly best at p=0.9 and DARE-TIES at p=0.1 (0.9 vs 0.6 accuracy): the table says the rates
    differ; DELLA with the same accuracy at every rate is never shown to differ."""
    rng = np.random.default_rng(4)
    n = 400
    draw = lambda p: {t: (rng.random(n) < p).astype(float) for t in TASKS}  # noqa: E731
    truth = {"ties": {0.1: 0.6, 0.5: 0.6, 0.9: 0.9}, "dare_ties": {0.1: 0.9, 0.5: 0.6, 0.9: 0.6},
             "della": {0.1: 0.7, 0.5: 0.7, 0.9: 0.7}}
    settings = [_setting(draw(acc), family=fam, params={"density": round(1 - p, 4)}, drop=p)
                for fam, by_p in truth.items() for p, acc in by_p.items()]
    fold = report.folds(settings, TASKS)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in report.drop_table(settings, TASKS, fold)
            if line.startswith("| ") and "(" in line}
    assert rows[("TIES (0.9)", "DARE-TIES (0.1)")].rstrip(" |").endswith("yes")
    della = [line for key, line in rows.items() if any(k.startswith("DELLA") for k in key)]
    assert della and not any(line.rstrip(" |").endswith("yes") for line in della)
