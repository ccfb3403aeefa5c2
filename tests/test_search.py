"""``MergeSearch`` in real ``fit`` runs on the tiny recipe models: two experts (each near 100 % on
its own synthetic task, near chance on the other); the chosen candidate is the one with the best
independently measured ``val/acc_mean``; training starts from it; CSV and logger rows; resume does
not search again; configuration errors at construction."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_merge import ConfigError, get_method, merge_models
from lightning_merge.lightning.data import SyntheticTokensDataModule
from lightning_merge.lightning.make_recipe_models import RECIPE_DATA, make_recipe_models
from lightning_merge.lightning.search import MergeSearch, expand_grid
from lightning_merge.lightning.tasks import SequenceClassifier

EXPERTS = ["expert_a", "expert_b"]
CANDIDATES = [
    {"method": "task_arithmetic", "lambda": 0.0},
    {"method": "task_arithmetic", "lambda": 0.5},
    {"method": "task_arithmetic", "lambda": 1.0},
    {"method": "linear"},
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search") / "recipes"
    make_recipe_models(root, steps=8)
    return root


def experts(zoo: Path) -> list[str]:
    return [str(zoo / e) for e in EXPERTS]


def module(zoo: Path) -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(str(zoo / "base"), num_labels=4, lr=1e-2)


def datamodule() -> SyntheticTokensDataModule:
    return SyntheticTokensDataModule(**RECIPE_DATA, n_train=64, n_val=64, batch_size=32)


def trainer(root: Path, callbacks: list, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
                logger=CSVLogger(str(root)), callbacks=callbacks)
    args.update(kw)
    return pl.Trainer(**args)


class Probe(Callback):
    """The target's weights when training starts (after the search)."""

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def independent_score(zoo: Path, cand: dict, root: Path) -> tuple[float, dict]:
    """merge_models offline, then a plain trainer.validate of a fresh module holding the merge."""
    params = {k: v for k, v in cand.items() if k != "method"}
    merged = merge_models(zoo / "base", experts(zoo), get_method(cand["method"], **params), seed=0)
    m = module(zoo)
    m.model.load_state_dict(merged, strict=False)
    [out] = [trainer(root, [], logger=False).validate(m, datamodule=datamodule(), verbose=False)[0]]
    return out["val/acc_mean"], merged


def test_search_picks_the_best_measured_candidate_and_trains_from_it(zoo, tmp_path):
    search = MergeSearch(experts(zoo), candidates=CANDIDATES, seed=0)
    probe = Probe()
    t = trainer(tmp_path / "run", [search, probe])
    t.fit(module(zoo), datamodule=datamodule())

    measured = [independent_score(zoo, c, tmp_path / f"ind{i}") for i, c in enumerate(CANDIDATES)]
    scores = [s for s, _ in measured]
    assert [r["score"] for r in search.results] == pytest.approx(scores, abs=1e-6)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert search.best_index == best and search.best == CANDIDATES[best]
    assert search.best_score == pytest.approx(scores[best], abs=1e-6)
    # the answer is known: lambda = 0 is the (chance-level) base, merging both experts helps
    assert scores[best] > scores[0] + 0.1 and best != 0

    # training started from the chosen merge
    merged = measured[best][1]
    for name, value in merged.items():
        assert torch.allclose(probe.start[name], value, atol=1e-6), name

    # one CSV row per candidate, with the params and the metric; logger rows with step = index
    log_dir = Path(t.log_dir)
    with (log_dir / "merge_search.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(CANDIDATES)
    assert [r["method"] for r in rows] == [c["method"] for c in CANDIDATES]
    assert [r["lambda"] for r in rows] == ["0.0", "0.5", "1.0", ""]
    assert [float(r["val/acc_mean"]) for r in rows] == pytest.approx(scores, abs=1e-6)
    assert [int(r["best"]) for r in rows] == [int(i == best) for i in range(len(rows))]
    with (log_dir / "metrics.csv").open() as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("merge_search/val/acc_mean")]
    assert sorted(int(r["step"]) for r in logged) == list(range(len(CANDIDATES)))
    # the candidate runs do not reach the logger: only the real end-of-epoch validation is there
    with (log_dir / "metrics.csv").open() as fh:
        val_rows = [r for r in csv.DictReader(fh) if r.get("val/acc_mean")]
    assert len(val_rows) == 1 and int(val_rows[0]["step"]) == 1
    state = search.state_dict()
    assert state["searched"] and state["best"] == CANDIDATES[best]


def test_grid_limit_and_resume_does_not_search_again(zoo, tmp_path):
    grid = {"method": ["task_arithmetic"], "lambda": [0.5, 1.0]}
    assert expand_grid(grid) == [{"method": "task_arithmetic", "lambda": 0.5},
                                 {"method": "task_arithmetic", "lambda": 1.0}]
    csv_path = tmp_path / "custom.csv"
    search = MergeSearch(experts(zoo), grid=grid, limit_val_batches=1, csv_path=str(csv_path))
    t = trainer(tmp_path / "run", [search])
    t.fit(module(zoo), datamodule=datamodule())
    assert len(search.results) == 2 and csv_path.is_file()
    [ckpt] = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    [key] = [k for k in saved["callbacks"] if k.startswith("MergeSearch")]
    assert saved["callbacks"][key]["best"] == search.best

    again = MergeSearch(experts(zoo), grid=grid, limit_val_batches=1, csv_path=str(tmp_path / "again.csv"))
    probe = Probe()
    trainer(tmp_path / "resumed", [again, probe], max_epochs=2).fit(module(zoo), datamodule=datamodule(),
                                                                    ckpt_path=str(ckpt))
    assert again.results == [] and again.best == search.best
    assert not (tmp_path / "again.csv").exists()
    for name, value in probe.start.items():
        assert torch.equal(value, saved["state_dict"][f"model.{name}"]), name


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of"),
    ({"candidates": [{"method": "linear"}], "grid": {"method": ["linear"]}}, "exactly one of"),
    ({"candidates": []}, "no candidates"),
    ({"candidates": [{"lambda": 1.0}]}, "'method' key"),
    ({"candidates": [{"method": "no_such_method"}]}, "candidate 0"),
    ({"candidates": [{"method": "ties", "densty": 0.5}]}, "densty"),
    ({"candidates": [{"method": "ties", "density": 1.5}]}, "candidate 0"),
    ({"candidates": [{"method": "linear", "weights": [1.0]}]}, "weights"),
    ({"grid": {"lambda": [1.0]}}, "'method' key"),
    ({"candidates": [{"method": "linear"}], "mode": "best"}, "mode"),
    ({"candidates": [{"method": "linear"}], "limit_val_batches": 0}, "limit_val_batches"),
])
def test_bad_config_errors_at_construction(zoo, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MergeSearch(experts(zoo), **kwargs)


def test_missing_expert_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        MergeSearch([str(tmp_path / "nope")], candidates=[{"method": "linear"}])


def test_inputs_read_once_lora_expert_and_min_mode(zoo, tmp_path, monkeypatch):
    """Every expert is opened once and each tensor read once, whatever the number of candidates; a
    LoRA adapter expert works; mode='min' on val/loss_mean picks the lowest loss."""
    from lightning_merge.lightning import search as search_module

    opened: list[str] = []
    reads: dict[tuple[str, str], int] = {}
    real_open = search_module.open_source

    def counting_open(spec):
        src = real_open(spec)
        opened.append(str(spec))
        get = src.get

        def counted(key):
            reads[(str(spec), key)] = reads.get((str(spec), key), 0) + 1
            return get(key)

        src.get = counted
        return src

    monkeypatch.setattr(search_module, "open_source", counting_open)
    paths = [*experts(zoo), str(zoo / "lora_c")]
    cands = [{"method": "ties", "density": 0.5}, {"method": "task_arithmetic", "lambda": 0.3},
             {"method": "dare_ties", "density": 0.5}]
    search = MergeSearch(paths, candidates=cands, monitor="val/loss_mean", mode="min", seed=3)
    probe = Probe()
    trainer(tmp_path / "run", [search, probe], limit_train_batches=1).fit(module(zoo), datamodule=datamodule())
    assert sorted(opened) == sorted(paths)
    assert reads and max(reads.values()) == 1
    scores = [r["score"] for r in search.results]
    assert search.best_index == min(range(3), key=lambda i: scores[i])
    cand = cands[search.best_index]
    params = {k: v for k, v in cand.items() if k != "method"}
    expected = merge_models(zoo / "base", paths, get_method(cand["method"], **params), seed=3)
    for name, value in expected.items():
        assert torch.allclose(probe.start[name], value, atol=1e-6), name


@pytest.mark.slow
def test_ddp_spawn_two_ranks_agree_with_one_process(zoo, tmp_path):
    """2-process DDP (gloo, ddp_spawn): every rank evaluates the same candidates; the CSV (rank 0)
    holds the same scores and choice as a 1-process search."""
    single = MergeSearch(experts(zoo), candidates=CANDIDATES)
    trainer(tmp_path / "one", [single], limit_train_batches=1).fit(module(zoo), datamodule=datamodule())
    search = MergeSearch(experts(zoo), candidates=CANDIDATES, csv_path=str(tmp_path / "ddp.csv"))
    trainer(tmp_path / "ddp", [search], devices=2, strategy="ddp_spawn",
            limit_train_batches=1).fit(module(zoo), datamodule=datamodule())
    with (tmp_path / "ddp.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["val/acc_mean"]) for r in rows] == pytest.approx([r["score"] for r in single.results],
                                                                      abs=1e-6)
    assert [int(r["best"]) for r in rows].index(1) == single.best_index
