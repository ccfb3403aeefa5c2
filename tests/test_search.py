"""``MergeSearch`` / ``DPPAAlphaSearch`` in real ``fit`` / ``validate`` runs on the tiny recipe models:
two experts (each near 100 % on its own synthetic task, near chance on the other); the chosen
candidate (explicit, grid, random) is the one with the best independently measured
``val/acc_mean``; training starts from it; validate reports it; CSV and logger rows; resume does
not search again; nothing is re-read from disk during a search; configuration errors at
construction; random draws reproducible and in range; the DPPA α search visits the reference's
sequence of α values on a constructed metric."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_merge import ConfigError, get_method, merge_models
from lightning_merge.examples.make_recipe_models import RECIPE_DATA, make_recipe_models
from lightning_merge.lightning.data import SyntheticTokensDataModule
from lightning_merge.lightning.search import MergeSearch, expand_grid
from lightning_merge.lightning.search_space import sample_space
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


# ------------------------------------------------------------------ random search: the space

SPACE = {"method": ["ties", "della"], "density": {"low": 0.2, "high": 0.8},
         "lambda": {"low": 0.5, "high": 2.0, "log": True}, "epsilon": [0.05, 0.1],
         "weights": [{"low": 0.5, "high": 1.5}, 1.0]}


def test_space_sampling_is_reproducible_typed_and_in_range():
    a = sample_space(SPACE, 40, 7, n_experts=2)
    assert a == sample_space(SPACE, 40, 7, n_experts=2)  # same seed, same draws
    assert a != sample_space(SPACE, 40, 8, n_experts=2)
    assert {c["method"] for c in a} == {"ties", "della"}
    for c in a:
        assert 0.2 <= c["density"] < 0.8 and 0.5 <= c["lambda"] < 2.0
        assert 0.5 <= c["weights"][0] < 1.5 and c["weights"][1] == 1.0
        # epsilon is DELLA's only: left out of a ties draw
        assert ("epsilon" in c) == (c["method"] == "della")
        if "epsilon" in c:
            assert c["epsilon"] in (0.05, 0.1)
        get_method(c["method"], **{k: v for k, v in c.items() if k not in ("method", "weights")})
    # log-uniform: about as many draws below the geometric midpoint (1.0) as above it
    assert 10 <= sum(c["lambda"] < 1.0 for c in a) <= 30
    # the other draws do not depend on which method was drawn: same lambdas with one method only
    only = sample_space({**SPACE, "method": ["della"]}, 40, 7, n_experts=2)
    assert [c["lambda"] for c in only] == [c["lambda"] for c in a]
    d = sample_space({"method": "task_arithmetic", "weights": {"dirichlet": [1.0, 2.0], "total": 2.0}}, 5, 0, 2)
    for c in d:
        assert sum(c["weights"]) == pytest.approx(2.0) and min(c["weights"]) > 0
    assert d[0]["weights"] != d[1]["weights"]


@pytest.mark.parametrize("kwargs, match", [
    ({"space": {"method": ["ties"]}}, "go together"),
    ({"candidates": [{"method": "linear"}], "num_samples": 3}, "go together"),
    ({"space": {"density": [0.5]}, "num_samples": 2}, r"space needs a 'method'"),
    ({"space": {"method": ["tiez"]}, "num_samples": 2}, r"space\['method'\].*tiez"),
    ({"space": {"method": ["ties"], "densty": [0.5]}, "num_samples": 2}, r"space\['densty'\]"),
    ({"space": {"method": ["ties"], "density": {"low": 0.9, "high": 0.1}}, "num_samples": 2},
     r"space\['density'\].*below"),
    ({"space": {"method": ["ties"], "density": {"low": 0.1, "hi": 0.9}}, "num_samples": 2}, r"'hi'"),
    ({"space": {"method": ["ties"], "lambda": {"low": 0.0, "high": 2.0, "log": True}}, "num_samples": 2},
     r"space\['lambda'\].*low > 0"),
    ({"space": {"method": ["ties"], "density": []}, "num_samples": 2}, r"space\['density'\].*empty"),
    ({"space": {"method": ["ties"], "weights": [1.0]}, "num_samples": 2}, r"space\['weights'\]"),
    ({"space": {"method": ["ties"], "weights": {"dirichlet": -1}}, "num_samples": 2}, "dirichlet"),
    ({"space": {"method": ["ties"]}, "num_samples": 0}, "num_samples"),
    ({"space": {"method": ["ties"]}, "num_samples": 2, "search_seed": "x"}, "search_seed"),
    # a draw the method refuses: found at construction, naming the sample
    ({"space": {"method": ["ties"], "density": {"low": 0.5, "high": 1.5}}, "num_samples": 8},
     r"space sample \d.*density"),
    ({"candidates": [{"method": "ties", "weights": [-1.0, 1.0]}]}, "negative"),
    ({"candidates": [{"method": "linear"}], "cache_device": "gpu"}, "cache_device"),
])
def test_bad_search_config_errors_at_construction(zoo, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MergeSearch(experts(zoo), **kwargs)


def test_grid_plus_random_picks_the_best_measured_candidate(zoo, tmp_path):
    """grid + space: the candidates are the grid then the draws; the chosen one is the best of the
    independently measured scores; every row is in the CSV with its origin."""
    grid = {"method": ["task_arithmetic"], "lambda": [0.0, 1.0]}
    space = {"method": ["task_arithmetic", "ties"], "lambda": {"low": 0.3, "high": 1.5},
             "density": [0.3, 0.7]}
    search = MergeSearch(experts(zoo), grid=grid, space=space, num_samples=3, search_seed=1)
    assert search.candidates[:2] == expand_grid(grid)
    assert search.candidates[2:] == sample_space(space, 3, 1, n_experts=2)
    probe = Probe()
    t = trainer(tmp_path / "run", [search, probe], limit_train_batches=1)
    t.fit(module(zoo), datamodule=datamodule())
    measured = [independent_score(zoo, c, tmp_path / f"ind{i}") for i, c in enumerate(search.candidates)]
    scores = [s for s, _ in measured]
    assert [r["score"] for r in search.results] == pytest.approx(scores, abs=1e-6)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert search.best_index == best and search.best == search.candidates[best] and best != 0
    for name, value in measured[best][1].items():
        assert torch.allclose(probe.start[name], value, atol=1e-6), name
    with (Path(t.log_dir) / "merge_search.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["origin"] for r in rows] == ["grid", "grid", "random", "random", "random"]
    assert [r["method"] for r in rows] == [c["method"] for c in search.candidates]
    assert [float(r["lambda"]) for r in rows] == pytest.approx([c["lambda"] for c in search.candidates])
    assert [r["density"] for r in rows] == [str(c["density"]) if "density" in c else ""
                                            for c in search.candidates]
    assert [int(r["best"]) for r in rows] == [int(i == best) for i in range(len(rows))]


# ------------------------------------------------------------------ caching: deltas, read once

def test_cache_holds_float32_deltas_and_full_weights_for_weight_only_searches(zoo):
    from lightning_merge.lightning.search_cache import cache_inputs
    from lightning_merge.sources.resolve import open_source

    m = module(zoo)
    srcs = [open_source(p) for p in [*experts(zoo), str(zoo / "lora_c")]]
    try:
        inputs = cache_inputs(m.model, srcs, space="delta")
        base = m.model.state_dict()
        assert [e.space for e in inputs.experts] == ["delta"] * 3
        expert_a = merge_models(zoo / "base", experts(zoo)[:1], get_method("task_arithmetic"), seed=0)
        for k in inputs.experts[0].keys():
            d = inputs.experts[0].get(k)
            assert d.dtype == torch.float32
            assert torch.allclose(d, expert_a[k].float() - base[k].float(), atol=1e-6), k
        # the LoRA adapter keeps only the tensors it changes
        assert 0 < len(inputs.experts[2].keys()) < len(inputs.experts[0].keys())
        full = cache_inputs(m.model, srcs[:2], space="weight")
        assert [e.space for e in full.experts] == ["weight", "weight"]
        k = full.experts[0].keys()[0]
        assert torch.equal(full.experts[0].get(k), srcs[0].get(k))  # the expert's own weights, as stored
    finally:
        for s in srcs:
            s.close()
    assert MergeSearch(experts(zoo), candidates=[{"method": "linear"}])._space() == "weight"
    assert MergeSearch(experts(zoo), candidates=[{"method": "linear"}, {"method": "ties"}])._space() == "delta"


def copy_experts(zoo: Path, root: Path) -> list[str]:
    import shutil

    out = []
    for e in EXPERTS:
        shutil.copytree(zoo / e, root / e)
        out.append(str(root / e))
    return out


class RenamesExperts(SequenceClassifier):
    """Moves the expert folders away when the first search candidate is validated: every later
    candidate and the final merge must come from memory."""

    def __init__(self, *args, expert_dirs: list[str], **kw):
        super().__init__(*args, **kw)
        self.expert_dirs = expert_dirs
        self.moved = False

    def on_validation_start(self):
        if not self.moved:
            for d in self.expert_dirs:
                Path(d).rename(d + ".moved")
            self.moved = True


def test_validate_searches_then_validates_the_chosen_merge_without_rereading(zoo, tmp_path):
    """trainer.validate with a MergeSearch: the search runs at on_validation_start (the experts are
    gone from disk after its first candidate), then the real validation epoch evaluates the chosen
    merge: its returned and logged metrics are the chosen candidate's. The dataloaders are shared
    with the search and have persistent workers (the real epoch still sees every batch)."""
    from torch.utils.data import DataLoader

    paths = copy_experts(zoo, tmp_path / "experts")
    search = MergeSearch(paths, candidates=CANDIDATES, cache_device="module")
    torch.manual_seed(0)
    m = RenamesExperts(str(zoo / "base"), num_labels=4, lr=1e-2, expert_dirs=paths)
    dm = datamodule()
    loaders = [DataLoader(dm.dataset("val", task), batch_size=32, num_workers=1, persistent_workers=True)
               for task in dm.task_names]
    t = trainer(tmp_path / "run", [search])
    out = t.validate(m, dataloaders=loaders, verbose=False)[0]
    assert m.moved and not Path(paths[0]).exists()
    scores = [independent_score(zoo, c, tmp_path / f"ind{i}")[0] for i, c in enumerate(CANDIDATES)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert search.searched and search.best_index == best
    assert [r["score"] for r in search.results] == pytest.approx(scores, abs=1e-6)
    assert out["val/acc_mean"] == pytest.approx(scores[best], abs=1e-6)
    with (Path(t.log_dir) / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["val/acc_mean"]) for r in rows if r.get("val/acc_mean")] == pytest.approx([scores[best]])
    assert len([r for r in rows if r.get("merge_search/val/acc_mean")]) == len(CANDIDATES)
    # a second validate with the same callback does not search again; test works after a search
    again = t.validate(m, dataloaders=loaders, verbose=False)[0]
    assert again["val/acc_mean"] == pytest.approx(scores[best], abs=1e-6) and len(search.results) == len(CANDIDATES)
    t.test(m, dataloaders=loaders, verbose=False)


def test_test_without_a_search_raises_before_any_batch(zoo, tmp_path):
    from lightning_merge import MergeError

    class Counts(Callback):
        batches = 0

        def on_test_batch_start(self, *args):
            Counts.batches += 1

    search = MergeSearch(experts(zoo), candidates=CANDIDATES[:1])
    with pytest.raises(MergeError, match="trainer.test"):
        trainer(tmp_path, [search, Counts()], logger=False).test(module(zoo), datamodule=datamodule())
    assert Counts.batches == 0


# ------------------------------------------------------------------ DPPA amplification-factor search

def run_ascent(score, **kw) -> list[tuple[float, float, str]]:
    """Drive alpha_coordinate_ascent with ``score(alpha_top, alpha_band)``; the visited sequence."""
    from lightning_merge.lightning.search_alpha import alpha_coordinate_ascent

    gen = alpha_coordinate_ascent(**kw)
    seen = [next(gen)]
    try:
        while True:
            seen.append(gen.send(score(*seen[-1][:2])))
    except StopIteration:
        return seen


def peak(top: float, band: float):
    return lambda a, b: 10.0 - (a - top) ** 2 - (b - band) ** 2


REFERENCE_PATH = [(1.8, 0.0, "alpha_top"), (1.9, 0.0, "alpha_top"), (2.0, 0.0, "alpha_top"),
                  (2.1, 0.0, "alpha_top"), (2.2, 0.0, "alpha_top"),        # worse: back to 2.1, switch
                  (2.1, 1.0, "alpha_band"), (2.1, 1.1, "alpha_band"),      # alpha_band < 0.1 jumps to 1
                  (2.1, 1.2, "alpha_band"), (2.1, 1.3, "alpha_band")]      # worse: stop


def test_alpha_coordinate_ascent_follows_the_reference():
    assert run_ascent(peak(2.1, 1.2)) == REFERENCE_PATH
    # the start is already best in alpha_top: one step up, back, then alpha_band from its start + step
    assert run_ascent(peak(1.0, 0.2), start=(1.5, 0.1)) == [
        (1.5, 0.1, "alpha_top"), (1.6, 0.1, "alpha_top"), (1.5, 0.2, "alpha_band"), (1.5, 0.3, "alpha_band")]
    # the reference's quirk: a coordinate at or below 1 is not stepped back after a failure
    assert run_ascent(peak(0.0, 0.0), start=(0.5, 0.3)) == [
        (0.5, 0.3, "alpha_top"), (0.6, 0.3, "alpha_top"), (0.6, 0.4, "alpha_band")]
    # minimizing, a custom step, and the max_evals bound (the reference has none)
    assert run_ascent(lambda a, b: (a - 2.0) ** 2, step=0.25, better=lambda a, b: a < b)[:4] == [
        (1.8, 0.0, "alpha_top"), (2.05, 0.0, "alpha_top"), (2.3, 0.0, "alpha_top"), (2.05, 1.0, "alpha_band")]
    with pytest.warns(UserWarning, match="max_evals"):
        assert len(run_ascent(lambda a, b: a + b, max_evals=5)) == 5
    # a NaN score never improves (a failed start above 1 steps back, as the reference does)
    assert run_ascent(lambda a, b: float("nan")) == [(1.8, 0.0, "alpha_top"), (1.7, 1.0, "alpha_band")]


class AlphaProbe(pl.LightningModule):
    """One prunable 8x8 matrix ``net.layers.0.q_proj.weight`` (base 0); its validation metric reads
    the amplification factors back from the merged weight (entries of the top and the band
    partitions divided by the expert's delta) and scores them with ``peak(2.1, 1.2)``. The expert
    file is moved away when the first candidate is validated."""

    def __init__(self, delta: torch.Tensor, expert_file: Path):
        super().__init__()
        block = torch.nn.Module()
        block.q_proj = torch.nn.Linear(8, 8, bias=False)
        self.net = torch.nn.Module()
        self.net.layers = torch.nn.ModuleList([block])
        torch.nn.init.zeros_(block.q_proj.weight)
        flat = delta.flatten()
        order = flat.abs().argsort(descending=True)
        # 64 entries: density_top 0.1 keeps the 6 largest, density_band 0.2 the 12 largest
        self.top_i, self.band_i = int(order[0]), int(order[8])
        self.delta, self.expert_file, self.moved = flat, expert_file, False
        self.score = peak(2.1, 1.2)

    def on_validation_start(self):
        if not self.moved:
            self.expert_file.rename(self.expert_file.with_suffix(".moved"))
            self.moved = True

    def validation_step(self, batch, batch_idx):
        w = self.net.layers[0].q_proj.weight.flatten()
        a_top = float(w[self.top_i] / self.delta[self.top_i])
        a_band = float(w[self.band_i] / self.delta[self.band_i])
        self.log("val/alpha_top", a_top)
        self.log("val/alpha_band", a_band)
        self.log("val/score", self.score(a_top, a_band))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1, 1)), batch_size=1)


def alpha_setup(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    delta = (torch.randperm(64, generator=g).float() + 1.0) / 64 * torch.where(
        torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    delta = delta.view(8, 8)
    path = tmp_path / "expert.safetensors"
    save_file({"layers.0.q_proj.weight": delta.contiguous()}, str(path))
    return delta, path


def test_dppa_alpha_search_visits_the_reference_sequence_and_keeps_the_best(tmp_path):
    """trainer.validate with DPPAAlphaSearch on a constructed metric: the CSV rows are the reference's
    α sequence, the kept merge is DPPA at the best α (the expert file is gone after the first
    candidate: the deltas and the pruning masks come from memory)."""
    from lightning_merge import DPPA, DPPAAlphaSearch

    delta, path = alpha_setup(tmp_path)
    search = DPPAAlphaSearch([str(path)], monitor="val/score", csv_path=str(tmp_path / "alpha.csv"))
    m = AlphaProbe(delta, path)
    out = trainer(tmp_path / "run", [search], logger=False).validate(m, verbose=False)[0]
    assert m.moved and not path.exists()
    visited = [(r["candidate"]["alpha_top"], r["candidate"]["alpha_band"], r["origin"]) for r in search.results]
    assert visited == REFERENCE_PATH
    assert search.best_index == 7 and search.best == {"method": "dppa", "alpha_top": 2.1, "alpha_band": 1.2}
    assert out["val/alpha_top"] == pytest.approx(2.1, abs=1e-5)
    assert out["val/alpha_band"] == pytest.approx(1.2, abs=1e-5)
    path.with_suffix(".moved").rename(path)
    expected = merge_models({"layers.0.q_proj.weight": torch.zeros(8, 8)}, [str(path)],
                            DPPA(alpha_top=2.1, alpha_band=1.2), seed=0)
    assert torch.equal(m.net.layers[0].q_proj.weight.detach(), expected["layers.0.q_proj.weight"])
    with (tmp_path / "alpha.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(float(r["alpha_top"]), float(r["alpha_band"]), r["origin"]) for r in rows] == REFERENCE_PATH
    assert [int(r["best"]) for r in rows] == [int(i == 7) for i in range(9)]
    assert [float(r["val/score"]) for r in rows] == pytest.approx(
        [peak(2.1, 1.2)(a, b) for a, b, _ in REFERENCE_PATH], abs=1e-5)


def test_dppa_alpha_search_geomean_objective_in_fit(zoo, tmp_path):
    """The reference's objective (dense_scores): rows hold each task metric and geomean_relative; the
    kept merge equals merge_models with DPPA at the best α; training starts from it."""
    from lightning_merge import DPPA, DPPAAlphaSearch

    dense = {"val/a/acc": 0.95, "val/b/acc": 0.9}
    search = DPPAAlphaSearch(experts(zoo), dppa={"density_top": 0.2, "density_band": 0.4}, start=(1.0, 0.0),
                             step=0.5, max_evals=4, dense_scores=dense)
    probe = Probe()
    t = trainer(tmp_path / "run", [search, probe], limit_train_batches=1)
    t.fit(module(zoo), datamodule=datamodule())
    assert 2 <= len(search.results) <= 4
    for r in search.results:
        ratios = [r["metrics"][k] / v for k, v in dense.items()]
        assert r["score"] == pytest.approx((ratios[0] * ratios[1]) ** 0.5, abs=1e-6)
    best = max(search.results, key=lambda r: (r["score"], -r["index"]))
    assert search.best_index == best["index"]
    params = {k: v for k, v in search.best.items() if k != "method"}
    expected = merge_models(zoo / "base", experts(zoo), DPPA(**params), seed=0)
    for name, value in expected.items():
        assert torch.allclose(probe.start[name], value, atol=1e-6), name
    with (Path(t.log_dir) / "merge_search.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"val/a/acc", "val/b/acc", "val/acc_mean", "geomean_relative", "alpha_top", "alpha_band"} <= set(rows[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"dppa": {"alpha_top": 2.0}}, "start="),
    ({"dppa": {"densty_top": 0.1}}, "densty_top"),
    ({"dppa": {"density_top": 0.5, "density_band": 0.2}}, "density_top"),
    ({"start": (-1.0, 0.0)}, "start"),
    ({"start": (1.8,)}, "start"),
    ({"step": 0.0}, "step"),
    ({"max_evals": 0}, "max_evals"),
    ({"weights": [1.0]}, "weights"),
    ({"dense_scores": {"val/a/acc": 0.0}}, "dense_scores"),
    ({"dense_scores": {"val/a/acc": 0.9}, "mode": "min"}, "mode='max'"),
    ({"cache_device": "cuda"}, "cache_device"),
])
def test_dppa_alpha_search_bad_config_errors_at_construction(zoo, kwargs, match):
    from lightning_merge import DPPAAlphaSearch

    with pytest.raises(ConfigError, match=match):
        DPPAAlphaSearch(experts(zoo), **kwargs)


def test_fsdp1_is_refused_before_any_search():
    """FSDP1 needs GPUs here, so the strategy object is real but the trainer is a stand-in holding it."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from lightning_merge.lightning.search import refuse_sharded

    with pytest.raises(ConfigError, match="FSDPStrategy strategy wraps the module .* use ModelParallelStrategy"):
        refuse_sharded("MergeSearch", SimpleNamespace(strategy=FSDPStrategy()))
    refuse_sharded("MergeSearch", SimpleNamespace(strategy=SingleDeviceStrategy("cpu")))  # accepted
    refuse_sharded("MergeSearch", SimpleNamespace(strategy=ModelParallelStrategy()))  # FSDP2: accepted
