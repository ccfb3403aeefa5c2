"""``lightning-merge fit|validate|test`` end to end (LightningCLI): a MergeCallback in the YAML, on
the tiny offline recipe models; --print_config round trips; every recipe in recipes/ parses."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lightning_merge import DareTies, Ties, merge_models
from lightning_merge.cli import main
from lightning_merge.examples.make_recipe_models import RECIPE_DATA, make_recipe_models
from lightning_merge.lightning.data import SyntheticTokensDataModule

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
#: the MergeCallback recipes (the search recipes hold a MergeSearch / DPPAAlphaSearch: tested below)
#: recipes built around one MergeCallback (the learned-merge and Sens recipes have their own tests)
MERGE_RECIPES = [p for p in RECIPES if "search" not in p.stem
                 and "class_path: lightning_merge.MergeCallback" in p.read_text()]
SEARCH_RECIPES = [p for p in RECIPES if "search" in p.stem]
EXPERTS = ["expert_a", "expert_b", "lora_c"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding out/recipes/{base,expert_a,expert_b,lora_c} (what the recipes point at)."""
    root = tmp_path_factory.mktemp("cli")
    make_recipe_models(root / "out" / "recipes", steps=8)
    return root


def config(workdir: Path, run_dir: Path, method: dict, *, finetune: str = "full", n_val: int = 64) -> dict:
    zoo = workdir / "out" / "recipes"
    return {
        "seed_everything": 0,
        "model": {"class_path": "lightning_merge.lightning.tasks.SequenceClassifier",
                  "init_args": {"model": str(zoo / "base"), "num_labels": 4, "lr": 1e-2, "finetune": finetune}},
        "data": {"class_path": "lightning_merge.lightning.data.SyntheticTokensDataModule",
                 "init_args": {**RECIPE_DATA, "n_train": 64, "n_val": n_val, "batch_size": 32}},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}},
            "callbacks": [{"class_path": "lightning_merge.MergeCallback",
                           "init_args": {"experts": [str(zoo / e) for e in EXPERTS], **method, "seed": 0}}],
        },
    }


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def logged(run_dir: Path) -> dict[str, float]:
    """The last non-empty value of every column of the (single) run's metrics.csv."""
    [path] = run_dir.glob("lightning_logs/version_*/metrics.csv")
    out: dict[str, float] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


@torch.no_grad()
def merged_accuracy(workdir: Path, method) -> dict[str, float]:
    """Per-task validation accuracy of the offline merge (merge_models) of the recipe experts."""
    from transformers import AutoModelForSequenceClassification

    zoo = workdir / "out" / "recipes"
    model = AutoModelForSequenceClassification.from_pretrained(zoo / "base", dtype=torch.float32)
    model.load_state_dict(merge_models(zoo / "base", [zoo / e for e in EXPERTS], method, seed=0), strict=False)
    dm = SyntheticTokensDataModule(**RECIPE_DATA, n_train=64, n_val=64)
    out = {}
    for task in dm.tasks:
        ds = dm.dataset("val", task).tensors
        out[task] = float((model(input_ids=ds["input_ids"]).logits.argmax(-1) == ds["labels"]).float().mean())
    return out


TIES = {"method": {"class_path": "lightning_merge.Ties", "init_args": {"density": 0.3}}, "target": "model"}


def test_validate_and_test_evaluate_the_merge(workdir, tmp_path):
    """validate / test log per-task metrics of exactly the merge merge_models computes, and the
    callback's diagnostics; the class_path and the name + method_params spellings agree."""
    expected = merged_accuracy(workdir, Ties(density=0.3))
    cfg = write(tmp_path / "ties.yaml", config(workdir, tmp_path / "v1", TIES))
    assert main(["validate", "--config", cfg]) == 0
    m = logged(tmp_path / "v1")
    for task, acc in expected.items():
        assert m[f"val/{task}/acc"] == pytest.approx(acc, abs=1e-6)
    assert m["val/acc_mean"] == pytest.approx(sum(expected.values()) / 3, abs=1e-6)
    assert 0 < m["merge/changed"] <= 1 and m["merge/tensors"] > 0

    by_name = {"method": "ties", "method_params": {"density": 0.3}}  # target auto-detected
    cfg = write(tmp_path / "named.yaml", config(workdir, tmp_path / "v2", by_name))
    assert main(["test", "--config", cfg]) == 0
    t = logged(tmp_path / "v2")
    assert {f"test/{task}/acc" for task in expected} | {"test/acc_mean", "test/f1_mean"} <= set(t)
    assert not any(k.startswith("val/") for k in t)
    assert all(0.0 <= t[f"test/{task}/acc"] <= 1.0 for task in expected)


def test_fit_merges_then_finetunes(workdir, tmp_path):
    """fit: the checkpoint records the merge (callback state) and, with finetune=head, its frozen
    backbone is exactly the merge (dare_ties through name + method_params + weights)."""
    method = {"method": "dare_ties", "method_params": {"density": 0.5, "lambda": 0.9}, "weights": [1.0, 0.5, 1.0],
              "target": "model"}
    cfg = write(tmp_path / "fit.yaml", config(workdir, tmp_path / "run", method, finetune="head"))
    assert main(["fit", "--config", cfg, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]) == 0
    [ckpt_path] = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    [(key, state)] = [(k, v) for k, v in ckpt["callbacks"].items() if k.startswith("MergeCallback")]
    assert state["merged"] is True and state["config_hash"] in key
    zoo = workdir / "out" / "recipes"
    expected = merge_models(zoo / "base", [zoo / e for e in EXPERTS], DareTies(density=0.5, lambda_=0.9),
                            weights=[1.0, 0.5, 1.0], seed=0)
    weights = ckpt["state_dict"]
    for name, value in expected.items():
        if name != "score.weight":  # the head trained
            assert torch.equal(weights[f"model.{name}"], value), name
    assert not torch.equal(weights["model.score.weight"], expected["score.weight"])
    assert (tmp_path / "run" / "lightning_logs" / "version_0" / "config.yaml").is_file()
    m = logged(tmp_path / "run")
    assert "val/acc_mean" in m and "merge/changed" in m

    # resuming from the checkpoint does not merge again over the fine-tuned weights
    assert main(["validate", "--config", cfg, f"--ckpt_path={ckpt_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'resumed'}"]) == 0
    assert logged(tmp_path / "resumed")["val/acc_mean"] == pytest.approx(m["val/acc_mean"], abs=1e-6)


def test_print_config_round_trip(workdir, tmp_path, capsys):
    cfg = write(tmp_path / "ties.yaml", config(workdir, tmp_path / "run", TIES, finetune="lora"))
    assert main(["fit", "--config", cfg, "--print_config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    [cb] = data["trainer"]["callbacks"]
    assert cb["init_args"]["method"]["class_path"].endswith("Ties")
    assert cb["init_args"]["method"]["init_args"]["density"] == 0.3
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main(["fit", "--config", str(saved), "--print_config"]) == 0
    assert capsys.readouterr().out == printed  # a fixed point
    assert main(["fit", "--config", str(saved), "--trainer.limit_train_batches=1",
                 "--trainer.limit_val_batches=1"]) == 0
    assert (tmp_path / "run" / "lightning_logs" / "version_0" / "config.yaml").is_file()


def test_bad_input_is_one_line_and_status_2(workdir, tmp_path, capsys):
    cfg = config(workdir, tmp_path / "run", TIES)
    cfg["trainer"]["callbacks"][0]["init_args"]["experts"][1] = str(tmp_path / "missing")
    assert main(["validate", "--config", write(tmp_path / "bad.yaml", cfg)]) == 2
    err = capsys.readouterr().err
    assert "lightning-merge: error: MergeCallback: experts[1]" in err and "missing" in err
    cfg = config(workdir, tmp_path / "run", {"method": "ties", "method_params": {"density": 1.5}})
    assert main(["validate", "--config", write(tmp_path / "bad2.yaml", cfg)]) == 2
    assert "density" in capsys.readouterr().err
    assert main(["validate", "--config", str(tmp_path / "bad.yaml"), "--trainer.no_such_flag=1"]) == 2


@pytest.mark.parametrize("recipe", MERGE_RECIPES, ids=[p.stem for p in MERGE_RECIPES])
def test_recipe_parses(recipe, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)  # the recipes' relative out/recipes/... paths resolve here
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    [cb] = data["trainer"]["callbacks"]
    assert cb["class_path"].endswith("MergeCallback")
    method = cb["init_args"]["method"]
    name = method if isinstance(method, str) else method["class_path"].rsplit(".", 1)[-1]
    assert name.lower().replace("_", "").startswith(recipe.stem.replace("_", ""))


def test_recipe_names():
    assert {p.stem for p in RECIPES} >= {"ties", "dare", "della", "adaptive_rms", "dppa"}


@pytest.mark.parametrize("recipe", MERGE_RECIPES, ids=[p.stem for p in MERGE_RECIPES])
def test_recipe_runs(recipe, workdir, tmp_path, monkeypatch):
    """Each recipe as written (its own paths, relative to the working folder): fit, a few steps."""
    run = tmp_path / "work"
    shutil.copytree(workdir / "out", run / "out")
    monkeypatch.chdir(run)
    assert main(["fit", "--config", str(recipe), "--trainer.limit_train_batches=2"]) == 0
    m = logged(run / "out" / "recipes" / "runs" / recipe.stem)
    assert {"val/a/acc", "val/b/acc", "val/c/acc", "val/acc_mean", "merge/changed"} <= set(m)


# ------------------------------------------------------------------ merge search recipes

def test_search_recipe_names():
    assert {p.stem for p in SEARCH_RECIPES} >= {"search", "dppa_search"}


@pytest.mark.parametrize("recipe", SEARCH_RECIPES, ids=[p.stem for p in SEARCH_RECIPES])
def test_search_recipe_print_config_round_trip(recipe, workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 0
    printed = capsys.readouterr().out
    [cb] = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert cb["class_path"].rsplit(".", 1)[-1] in ("MergeSearch", "DPPAAlphaSearch")
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main(["fit", "--config", str(saved), "--print_config"]) == 0
    assert capsys.readouterr().out == printed  # a fixed point


def search_rows(run_dir: Path) -> list[dict[str, str]]:
    [path] = run_dir.glob("lightning_logs/version_*/merge_search.csv")
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("recipe", SEARCH_RECIPES, ids=[p.stem for p in SEARCH_RECIPES])
def test_search_recipe_fit_and_validate(recipe, workdir, tmp_path, monkeypatch):
    """Each search recipe as written: fit (search, then a few training steps) writes one CSV row per
    candidate; validate logs exactly the chosen candidate's score (its full validation)."""
    run = tmp_path / "work"
    shutil.copytree(workdir / "out", run / "out")
    monkeypatch.chdir(run)
    small = ["--data.init_args.n_val=64", "--data.init_args.n_train=64"]
    out = run / "out" / "recipes" / "runs" / recipe.stem
    assert main(["fit", "--config", str(recipe), "--trainer.limit_train_batches=1", *small]) == 0
    rows = search_rows(out)
    assert sum(int(r["best"]) for r in rows) == 1 and "val/acc_mean" in logged(out)
    if recipe.stem == "search":
        assert [r["origin"] for r in rows] == ["grid"] * 6 + ["random"] * 4
        assert {r["method"] for r in rows} == {"ties", "dare_ties", "della"}
    else:
        assert rows[0]["alpha_top"] == "1.8" and rows[0]["alpha_band"] == "0.0"
        assert {r["origin"] for r in rows} == {"alpha_top", "alpha_band"}
    shutil.rmtree(out)
    assert main(["validate", "--config", str(recipe), *small]) == 0
    rows = search_rows(out)
    [best] = [r for r in rows if r["best"] == "1"]
    assert logged(out)["val/acc_mean"] == pytest.approx(float(best["val/acc_mean"]), abs=1e-6)


def test_search_recipe_test_without_a_search_is_an_error(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    recipe = next(p for p in SEARCH_RECIPES if p.stem == "search")
    assert main(["test", "--config", str(recipe), "--data.init_args.n_val=32"]) == 2
    err = capsys.readouterr().err
    assert "lightning-merge: error: MergeSearch searches on the validation loop" in err


def test_search_bad_space_is_one_line_and_status_2(workdir, tmp_path, capsys):
    zoo = workdir / "out" / "recipes"
    cfg = config(workdir, tmp_path / "run", TIES)
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning_merge.MergeSearch", "init_args": {
        "experts": [str(zoo / e) for e in EXPERTS], "space": {"method": ["ties"], "densty": [0.5]},
        "num_samples": 2}}]
    assert main(["fit", "--config", write(tmp_path / "bad.yaml", cfg)]) == 2
    assert "space['densty']" in capsys.readouterr().err
