"""recipes/regmean.yaml and fisher.yaml as written: ``--print_config`` is a fixed point, and a
``validate`` run on the tiny offline recipe models logs per-task metrics and writes statistics
that reproduce the merge offline (``merge_method: regmean`` / ``fisher`` in a CLI merge config)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from svd_helpers import load_folder, run_merge_cli
from test_learned_recipes import logged

from lightning_merge.cli import main
from lightning_merge.examples.make_recipe_models import make_recipe_models
from lightning_merge.learned import MergeStatistics

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CALLBACKS = {"regmean": "RegMeanMergeCallback", "fisher": "FisherMergeCallback"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("regmean_cli")
    make_recipe_models(root / "out" / "recipes", steps=2)
    return root


@pytest.mark.parametrize("recipe", sorted(CALLBACKS))
def test_print_config_is_a_fixed_point(recipe, workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["validate", "--config", str(RECIPES / f"{recipe}.yaml"), "--print_config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main(["validate", "--config", str(saved), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    [cb] = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert cb["class_path"] == f"lightning_merge.learned.{CALLBACKS[recipe]}"



@pytest.mark.parametrize("recipe", sorted(CALLBACKS))
def test_recipe_runs_and_its_statistics_merge_offline(recipe, workdir, tmp_path, monkeypatch):
    run = tmp_path / "work"
    shutil.copytree(workdir / "out", run / "out")
    monkeypatch.chdir(run)
    assert main(["validate", "--config", str(RECIPES / f"{recipe}.yaml"), "--trainer.limit_val_batches=1"]) == 0
    out = run / "out" / "recipes" / "runs" / recipe
    m = logged(out)
    assert {"val/a/acc", "val/b/acc", "val/c/acc", "merge/time_s"} <= set(m)
    stats_file = out / f"{recipe}_stats.safetensors"
    stats = MergeStatistics.load(stats_file, kind=recipe)
    assert len(stats.experts) == 3 and stats.settings["max_batches"] == 4
    # the same statistics through `lightning-merge merge` (the YAML form of the registered method)
    experts = [str(run / "out" / "recipes" / e) for e in ("expert_a", "expert_b", "lora_c")]
    cfg = {"merge_method": recipe, "base_model": str(run / "out" / "recipes" / "base"),
           "models": [{"model": e} for e in experts], "parameters": {"statistics": str(stats_file)}}
    merged = run_merge_cli(cfg, tmp_path / "merged")
    base = load_folder(run / "out" / "recipes" / "base")
    q = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert merged[q].shape == base[q].shape and not torch.equal(merged[q], base[q])
