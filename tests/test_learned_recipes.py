"""recipes/dam.yaml, adamerging.yaml and sens.yaml as written: ``--print_config`` is a fixed point
and a short run on the tiny offline recipe models logs per-task metrics and writes the outputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from lightning_merge.cli import main
from lightning_merge.examples.make_recipe_models import make_recipe_models

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LEARNED = ["dam", "adamerging", "sens"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("learned_cli")
    make_recipe_models(root / "out" / "recipes", steps=2)
    return root


def logged(run_dir: Path) -> dict[str, float]:
    [path] = run_dir.glob("lightning_logs/version_*/metrics.csv")
    out: dict[str, float] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


@pytest.mark.parametrize("recipe", LEARNED)
def test_print_config_is_a_fixed_point(recipe, workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["fit", "--config", str(RECIPES / f"{recipe}.yaml"), "--print_config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main(["fit", "--config", str(saved), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    data = yaml.safe_load(printed)
    if recipe == "sens":
        [cb] = data["trainer"]["callbacks"]
        assert cb["class_path"] == "lightning_merge.learned.SensMergeCallback"
    else:
        assert data["model"]["class_path"] == "lightning_merge.learned.LearnedMerge"


@pytest.mark.parametrize("recipe", LEARNED)
def test_recipe_runs(recipe, workdir, tmp_path, monkeypatch):
    run = tmp_path / "work"
    shutil.copytree(workdir / "out", run / "out")
    monkeypatch.chdir(run)
    command = "validate" if recipe == "sens" else "fit"
    assert main([command, "--config", str(RECIPES / f"{recipe}.yaml"), "--trainer.limit_train_batches=2",
                 "--trainer.limit_val_batches=1"]) == 0
    out = run / "out" / "recipes" / "runs" / recipe
    m = logged(out)
    assert {"val/a/acc", "val/b/acc", "val/c/acc"} <= set(m)
    if recipe == "sens":
        factors = json.loads((out / "sens_factors.json").read_text())
        assert len(factors["sigma"]) == 3 and "merge/changed" in m
    else:
        assert {"val/acc_mean", f"train/{'dam' if recipe == 'dam' else 'entropy'}"} <= set(m)
        assert (out / "merged" / "model.safetensors").is_file()
        assert (out / "merged" / "learned_coefficients" / "coefficients.png").is_file()
