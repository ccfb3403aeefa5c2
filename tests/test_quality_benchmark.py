"""The quality benchmark's --quick mode end to end (slow: ~10 minutes on 2 cores): real MiniLM experts,
every merge family through MergeCallback at trainer.test, one merge also through `lightning-merge merge`,
the report with its paired tests and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_merge.errors import SourceError
from lightning_merge.examples.corpora import minilm_dir

ROOT = Path(__file__).resolve().parents[1]


def _has_data() -> bool:
    try:
        minilm_dir()
    except SourceError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_data(), reason="offline data packages missing: make setup installs them")
def test_quick_benchmark_runs_and_reports(tmp_path):
    results = tmp_path / "results_quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality" / "run.py"), "--quick", "--workdir",
                           str(tmp_path / "work"), "--results", str(results), "--threads", "1"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("base") == 1 and kinds.count("expert") == len(data["meta"]["tasks"])
    families = {r["family"] for r in data["rows"] if r["kind"] == "merge"}
    assert {"soup", "task_arithmetic", "ties", "dare_ties", "della", "dppa", "adaptive_rms_pooled",
            "adaptive_rms_own"} <= families
    report = results.with_suffix(".md").read_text()
    assert "The papers' claims" in report and "DELLA beats TIES" in report
    assert (tmp_path / "results_quick_full_drop.png").stat().st_size > 10_000
    # the command-line merge of the same DPPA scores example for example as the MergeCallback's
    assert kinds.count("cli") == 1
    assert "per-example outcomes are identical to the MergeCallback" in report
    # experts are real experts: each beats the base on its own task
    base = next(r for r in data["rows"] if r["kind"] == "base")
    for r in data["rows"]:
        if r["kind"] == "expert":
            assert r["acc"][r["task"]] > base["acc"][r["task"]], r["task"]
