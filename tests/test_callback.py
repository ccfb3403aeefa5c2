"""``MergeCallback`` inside real Trainer runs: a tiny Llama in a LightningModule, experts saved with
``save_pretrained`` and a real PEFT LoRA adapter; fit / validate / test, resume, two callbacks,
restore, configuration errors, diagnostics in a CSVLogger and 2-process DDP (gloo, ddp_spawn)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo_helpers import save_zoo

from lightning_merge import AdaptiveRMS, ConfigError, DareTies, TaskArithmetic, Ties, merge_models
from lightning_merge.engine import TensorTask
from lightning_merge.lightning import MergeCallback, MergeSetupError, group_of, split_tasks
from lightning_merge.lightning import callback as callback_module

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)


def llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


class LitLM(pl.LightningModule):
    """An HF causal LM as ``self.model`` (module level so that ddp_spawn workers can unpickle it).

    With ``dump_dir``, each rank saves its model's state dict and the merge callbacks' diagnostics
    at ``on_validation_start`` (after every setup, before any step)."""

    def __init__(self, seed: int = 0, dump_dir: str | None = None, lr: float = 0.05):
        super().__init__()
        self.model = llama(seed)
        self.dump_dir = dump_dir
        self.lr = lr

    def _loss(self, batch) -> torch.Tensor:
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_validation_start(self) -> None:
        if self.dump_dir is None:
            return
        from safetensors.torch import save_file

        rank = self.trainer.global_rank
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                  str(Path(self.dump_dir) / f"rank{rank}.safetensors"))
        diags = [cb.diagnostics for cb in self.trainer.callbacks if isinstance(cb, MergeCallback)]
        (Path(self.dump_dir) / f"rank{rank}.json").write_text(json.dumps(diags))


class Probe(Callback):
    """Snapshots of ``pl_module.model`` at the start of fit / validation / test / each epoch."""

    def __init__(self) -> None:
        self.snaps: dict[str, dict[str, torch.Tensor]] = {}

    def _snap(self, key: str, pl_module) -> None:
        self.snaps.setdefault(key, {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    def on_fit_start(self, trainer, pl_module):
        self._snap("fit", pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._snap("validate", pl_module)

    def on_test_start(self, trainer, pl_module):
        self._snap("test", pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self._snap(f"epoch{trainer.current_epoch}", pl_module)


def loader(n: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (n, 12), generator=gen)
    return DataLoader(TensorDataset(ids), batch_size=4, shuffle=False)


def trainer(tmp_path: Path, callbacks: list, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=1, default_root_dir=str(tmp_path), deterministic=True)
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    """base/ (= LitLM(seed=0).model), e0/, e1/ (perturbed full copies), lora/ (a PEFT adapter)."""
    root = tmp_path_factory.mktemp("callback_zoo")
    return save_zoo(root, llama, (0.02, 0.02), lora_r=4)


def experts(zoo) -> list[str]:
    return [zoo["e0"], zoo["e1"], zoo["lora"]]


def assert_same(actual: dict, expected: dict) -> None:
    assert set(expected) <= set(actual), set(expected) - set(actual)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        assert torch.equal(actual[k], expected[k]), k


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ fit / validate / test

def test_fit_merges_in_setup_then_trains(zoo, tmp_path):
    method = DareTies(density=0.5)
    expected = merge_models(zoo["base"], experts(zoo), method, weights=[1.0, 0.5, 1.0], seed=3)
    model, probe = LitLM(), Probe()
    cb = MergeCallback(experts(zoo), method, weights=[1.0, 0.5, 1.0], seed=3)
    trainer(tmp_path, [cb, probe], limit_train_batches=2).fit(model, loader(), loader())
    assert cb.merged and cb.target_name == "model"
    assert_same(probe.snaps["fit"], expected)
    final = state(model.model)
    assert any(not torch.equal(final[k], expected[k]) for k in expected), "training changed nothing"
    assert cb.diagnostics["tensors"] > 0 and 0 < cb.diagnostics["changed"] <= 1


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_or_test_merge_once(zoo, tmp_path, stage):
    method = Ties(density=0.5, lambda_=0.9)
    expected = merge_models(zoo["base"], experts(zoo), method, seed=0)
    model, probe = LitLM(), Probe()
    cb = MergeCallback(experts(zoo), "ties", method_params={"density": 0.5, "lambda": 0.9})
    t = trainer(tmp_path, [cb, probe])
    getattr(t, stage)(model, loader())
    assert_same(probe.snaps[stage], expected)
    time_s = cb.diagnostics["time_s"]
    getattr(t, stage)(model, loader())  # same trainer and callback: no second merge
    assert_same(state(model.model), expected)
    assert cb.diagnostics["time_s"] == time_s


def test_stage_not_configured_does_not_merge(zoo, tmp_path):
    model = LitLM()
    before = state(model.model)
    cb = MergeCallback(experts(zoo), "task_arithmetic", stages=["fit"])
    trainer(tmp_path, [cb]).validate(model, loader())
    assert not cb.merged
    assert_same(state(model.model), before)


def test_explicit_base_and_target(zoo, tmp_path):
    """base= a folder (not the module's own weights), target= given explicitly."""
    method = TaskArithmetic(lambda_=0.5)
    expected = merge_models(zoo["base"], [zoo["e0"], zoo["lora"]], method)
    model = LitLM(seed=7)  # other weights in the module: the base folder is the base
    cb = MergeCallback([zoo["e0"], zoo["lora"]], method, base=zoo["base"], target="model")
    trainer(tmp_path, [cb]).validate(model, loader())
    assert_same(state(model.model), expected)


def test_restore_brings_back_pre_merge_weights(zoo, tmp_path):
    model = LitLM()
    before = state(model.model)
    cb = MergeCallback(experts(zoo), DareTies(density=0.3))
    trainer(tmp_path, [cb]).validate(model, loader())
    assert any(not torch.equal(state(model.model)[k], before[k]) for k in before)
    cb.restore()
    assert not cb.merged
    assert_same(state(model.model), before)
    with pytest.raises(Exception, match="no pre-merge weights"):
        MergeCallback(experts(zoo), keep_backup=False).restore()


# ----------------------------------------------------------------------------------------- resume

def _resume_config(zoo) -> dict:
    return dict(experts=experts(zoo), method="dare_ties", method_params={"density": 0.5}, seed=5)


def _fit(tmp_path, zoo, max_epochs, ckpt_path=None, cb=None, ckpt_dir=None, probe=None):
    pl.seed_everything(0, verbose=False)
    model = LitLM()
    callbacks = [cb or MergeCallback(**_resume_config(zoo))] + ([probe] if probe else [])
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True))
    t = trainer(tmp_path, callbacks, max_epochs=max_epochs, limit_train_batches=2,
                enable_checkpointing=ckpt_dir is not None)
    t.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model, callbacks[0]


@pytest.fixture(scope="module")
def interrupted(zoo, tmp_path_factory):
    """A 2-epoch run with last.ckpt, and the uninterrupted 3-epoch run's final weights."""
    tmp = tmp_path_factory.mktemp("resume")
    _fit(tmp / "a", zoo, 2, ckpt_dir=tmp / "ckpt")
    full, _ = _fit(tmp / "c", zoo, 3)
    return tmp / "ckpt" / "last.ckpt", state(full.model)


def _ckpt_model_state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def test_resume_skips_merge_and_matches_uninterrupted_run(zoo, tmp_path, interrupted):
    last, full = interrupted
    probe = Probe()
    model, cb = _fit(tmp_path, zoo, 3, ckpt_path=str(last), probe=probe)
    assert cb._skipped_for == str(last), "the checkpoint already holds this merge: no merge in setup"
    assert cb.merged and cb.diagnostics == {}
    assert_same(probe.snaps["epoch2"], _ckpt_model_state(last))
    assert_same(state(model.model), full)


def test_resume_without_peek_still_restores_checkpoint_weights(zoo, tmp_path, interrupted, monkeypatch):
    """If the checkpoint path cannot be found at setup, the merge runs and the restore replaces it."""
    monkeypatch.setattr(callback_module, "pending_ckpt_path", lambda trainer: (False, None))
    last, full = interrupted
    probe = Probe()
    model, cb = _fit(tmp_path, zoo, 3, ckpt_path=str(last), probe=probe)
    assert cb._skipped_for is None and cb.merged
    assert_same(probe.snaps["epoch2"], _ckpt_model_state(last))
    assert_same(state(model.model), full)


def test_resume_with_other_merge_config_warns(zoo, tmp_path, interrupted):
    last, _ = interrupted
    other = MergeCallback(**{**_resume_config(zoo), "seed": 6})
    probe = Probe()
    with pytest.warns(UserWarning, match="another merge configuration"):
        _fit(tmp_path, zoo, 3, ckpt_path=str(last), cb=other, probe=probe)
    assert not other.merged
    assert_same(probe.snaps["epoch2"], _ckpt_model_state(last))


def test_state_dict_round_trip(zoo):
    cb = MergeCallback(**_resume_config(zoo))
    assert cb.state_dict() == {"merged": False, "config_hash": cb.config_hash}
    cb.load_state_dict({"merged": True, "config_hash": cb.config_hash})
    assert cb.merged
    assert cb.config_hash in cb.state_key


# -------------------------------------------------------------------------------- several callbacks

def test_two_callbacks_coexist_and_apply_in_order(zoo, tmp_path):
    first = MergeCallback([zoo["e0"]], TaskArithmetic(lambda_=0.5))
    second = MergeCallback([zoo["e1"], zoo["lora"]], Ties(density=0.4))
    assert first.state_key != second.state_key
    model = LitLM()
    trainer(tmp_path, [first, second]).validate(model, loader())
    step1 = merge_models(zoo["base"], [zoo["e0"]], TaskArithmetic(lambda_=0.5))
    expected = merge_models(step1, [zoo["e1"], zoo["lora"]], Ties(density=0.4))
    assert_same(state(model.model), expected)


def test_same_config_twice_is_refused(zoo, tmp_path):
    with pytest.raises(RuntimeError, match="state_key"):
        trainer(tmp_path, [MergeCallback([zoo["e0"]]), MergeCallback([zoo["e0"]])])


# ---------------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kwargs, match", [
    (dict(method="no_such_method"), "unknown merge method"),
    (dict(method="ties", method_params={"density": 2.0}), "density"),
    (dict(method="ties", method_params={"nope": 1}), "nope"),
    (dict(method=Ties(), method_params={"nope": 1}), "method_params"),
    (dict(weights=[1.0]), "weights has 1 values for 2 experts"),
    (dict(method="ties", weights=[1.0, -1.0]), "negative weights"),
    (dict(weights=[1.0, "heavy"]), "weights"),
    (dict(method="dare_ties", method_params={"density": [0.5, 0.5, 0.5]}), "method: .*one value per expert"),
    (dict(stages=["fit", "training"]), "stages"),
    (dict(stages=[]), "stages"),
    (dict(device="gpu9000"), "device"),
    (dict(vocab_policy="grow"), "vocab_policy"),
    (dict(seed=1.5), "seed"),
])
def test_bad_configuration_fails_at_construction(zoo, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MergeCallback([zoo["e0"], zoo["e1"]], **kwargs)


def test_missing_paths_fail_at_construction(zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"experts\[1\].*no such file"):
        MergeCallback([zoo["e0"], str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="base.*no such file"):
        MergeCallback([zoo["e0"]], base=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="non-empty list"):
        MergeCallback(zoo["e0"])


class TwoModels(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.student, self.teacher = llama(0), llama(1)


class LateModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)

    def configure_model(self):
        self.model = llama(0)


def _setup(cb: MergeCallback, module: pl.LightningModule, tmp_path: Path) -> None:
    t = trainer(tmp_path, [cb])
    t.strategy.connect(module)
    cb.setup(t, module, "validate")


def test_target_errors_at_setup(zoo, tmp_path):
    with pytest.raises(MergeSetupError, match="several submodules.*'student'.*'teacher'"):
        _setup(MergeCallback([zoo["e0"]]), TwoModels(), tmp_path)
    with pytest.raises(MergeSetupError, match="target='pupil' is not a submodule"):
        _setup(MergeCallback([zoo["e0"]], target="pupil"), TwoModels(), tmp_path)
    with pytest.raises(MergeSetupError, match="no submodule.*configure_model"):
        _setup(MergeCallback([zoo["e0"]]), LateModel(), tmp_path)
    cb = MergeCallback([zoo["e0"]], target="teacher")
    module = TwoModels()
    _setup(cb, module, tmp_path)
    assert_same(state(module.teacher), merge_models(llama(1).state_dict(), [zoo["e0"]], TaskArithmetic()))


def test_meta_device_target_is_refused(zoo, tmp_path):
    with torch.device("meta"):
        module = LitLM()
    with pytest.raises(MergeSetupError, match="SingleDeviceStrategy.*meta device"):
        _setup(MergeCallback([zoo["e0"]]), module, tmp_path)


def test_jsonargparse_understands_the_signature(zoo):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MergeCallback, "merge")
    cfg = parser.parse_object({"merge": {"experts": [zoo["e0"], zoo["e1"]], "method": "ties",
                                         "method_params": {"density": 0.3}, "stages": ["fit"]}})
    cb = parser.instantiate_classes(cfg).merge
    assert cb.method == Ties(density=0.3) and cb.stages == ("fit",)
    spec = {"class_path": "lightning_merge.DareTies", "init_args": {"density": 0.3, "lambda_": 0.8}}
    cfg = parser.parse_object({"merge": {"experts": [zoo["e0"]], "method": spec, "weights": [0.5]}})
    cb = parser.instantiate_classes(cfg).merge
    assert cb.method == DareTies(density=0.3, lambda_=0.8) and cb.weights == [0.5]


# ------------------------------------------------------------------------------------- diagnostics

def test_diagnostics_reach_csv_logger(zoo, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="run")
    cb = MergeCallback(experts(zoo), AdaptiveRMS(drop_rate=0.5, drop_scale=10.0))
    trainer(tmp_path, [cb], logger=logger, limit_train_batches=1).fit(LitLM(), loader(), loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    merged = {k: v for row in rows for k, v in row.items() if k.startswith("merge/") and v}
    for key in ("merge/time_s", "merge/tensors", "merge/changed", "merge/sign_conflict",
                "merge/model.layers.0/changed", "merge/model.layers.1/drop_rate",
                "merge/model.layers.0/sign_conflict", "merge/lm_head/changed"):
        assert key in merged, (key, sorted(merged))
    assert 0 <= float(merged["merge/model.layers.1/drop_rate"]) <= 1


def test_split_tasks_is_balanced_and_deterministic():
    tasks = [TensorTask(f"t{i}", (n,), torch.float32, []) for i, n in enumerate([50, 10, 40, 30, 20, 5, 5, 1])]
    shares = split_tasks(tasks, 2)
    assert sorted(t.name for s in shares for t in s) == sorted(t.name for t in tasks)
    loads = [sum(t.numel for t in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 5
    # ownership depends on sizes and names only, not on the order of the plan
    assert [{t.name for t in s} for s in split_tasks(tasks[::-1], 2)] == [{t.name for t in s} for s in shares]
    assert sum(len(s) for s in split_tasks(tasks, 3)) == len(tasks)
    assert group_of("model.model.layers.3.self_attn.q_proj.weight") == "model.model.layers.3"
    assert group_of("lm_head.weight") == "lm_head"


# ---------------------------------------------------------------------------------------------- DDP

def test_ddp_ranks_hold_identical_merge_equal_to_one_process(zoo, tmp_path):
    """2 CPU processes (gloo): a stochastic method, then a statistics method; each rank merges half
    of the tensors and receives the rest; both end with the one-process result."""
    from safetensors.torch import load_file

    dare = DareTies(density=0.5)
    arms = AdaptiveRMS(drop_rate=0.6, drop_scale=10.0)
    model = LitLM(dump_dir=str(tmp_path))
    callbacks = [MergeCallback(experts(zoo), dare, seed=11), MergeCallback(experts(zoo), arms, seed=12)]
    t = trainer(tmp_path, callbacks, devices=2, strategy="ddp_spawn")
    t.validate(model, loader())
    step1 = merge_models(zoo["base"], experts(zoo), dare, seed=11)
    expected = merge_models(step1, experts(zoo), arms, seed=12)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert_same(ranks[0], expected)
    assert_same(ranks[1], expected)
    for r in range(2):
        diags = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert [d["world_size"] for d in diags] == [2.0, 2.0]


def test_ddp_failure_on_one_rank_fails_every_rank(zoo, tmp_path):
    """NaN in one tensor: only its owner rank fails while merging; the other rank must not wait
    forever in the next collective but fail too, naming the cause."""
    bad = llama(0)
    with torch.no_grad():
        bad.get_parameter("model.layers.1.self_attn.o_proj.weight")[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan_expert")
    cb = MergeCallback([zoo["e0"], str(tmp_path / "nan_expert")], TaskArithmetic())
    t = trainer(tmp_path, [cb], devices=2, strategy="ddp_spawn")
    with pytest.raises(Exception, match="NaN"):
        t.validate(LitLM(), loader())


def test_a_fresh_module_given_to_a_callback_that_merged_is_merged_too(zoo, tmp_path, caplog):
    import logging

    cb = MergeCallback(experts(zoo), DareTies(density=0.3), seed=2)
    first = LitLM()
    trainer(tmp_path, [cb]).validate(first, loader())
    merged_first = state(first.model)
    trainer(tmp_path, [cb]).validate(first, loader())  # the same module: not merged twice
    assert_same(state(first.model), merged_first)
    fresh = LitLM()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [cb]).validate(fresh, loader())
    assert_same(state(fresh.model), merged_first)  # merged, never silently left as the base
    assert "is a new module, so the experts are merged into it" in caplog.text
