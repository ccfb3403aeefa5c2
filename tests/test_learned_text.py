"""``LearnedMerge`` over the shared encoder of an ``EncoderClassifier`` (AdaMerging / DAM on the real
text tasks): the one-task logits, the ``TaskLogits`` adapter, the per-task text data module, the
wrapper against task arithmetic, the encoder-only export, and a few entropy / DAM steps that change
only the coefficients. A tiny random BERT with MiniLM's tokenizer, as in ``test_real_text.py``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from test_learned_helpers import trainer_kwargs
from text_helpers import MINILM, tiny_text_experiment

from lightning_merge import TaskArithmetic, merge_models
from lightning_merge.errors import ConfigError

TASKS = ["sentiment", "topic"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random BERT encoder with MiniLM's tokenizer, real data files, probe heads and two
    "experts": the base with random task vectors on every tensor but the (frozen) word embeddings."""
    if MINILM is None:
        pytest.skip("offline data packages missing")
    from transformers import BertModel

    root = tmp_path_factory.mktemp("learned_text")
    exp = tiny_text_experiment(root, TASKS, {"probe": 48, "train": 32, "val": 16, "test": 24}, batch_size=8)
    gen = torch.Generator().manual_seed(1)
    experts = []
    for t in TASKS:
        m = BertModel.from_pretrained(root / "base")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "word_embeddings" not in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        m.save_pretrained(root / "experts" / t)
        experts.append(str(root / "experts" / t))
    return root, exp, experts


def _datamodule(exp, **kw):
    from lightning_merge.learned import PerTaskTextDataModule

    return PerTaskTextDataModule(exp.base, train_files={t: exp.files[t]["train"] for t in TASKS},
                                 val_files={t: exp.files[t]["val"] for t in TASKS}, max_length=exp.max_length,
                                 batch_size=4, **kw)


def _wrapped(exp, experts, **kw):
    from lightning_merge.examples.encoder import TaskLogits
    from lightning_merge.learned import LearnedMerge

    return LearnedMerge(TaskLogits(exp.module(), task_names=TASKS), experts, target="classifier.model", **kw)


def _batches(exp) -> dict[str, dict[str, torch.Tensor]]:
    dm = _datamodule(exp)
    dm.setup("fit")
    return {t: next(iter(loader)) for t, loader in dm.train_dataloader().items()}


def test_task_logits_is_the_stacked_forward_of_one_task(tiny_setup):
    root, exp, _ = tiny_setup
    module = exp.module().eval()
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    for task, classes in ((0, 2), (1, 5)):
        z = module.task_logits(ids, mask, torch.full((3,), task))
        assert z.shape == (3, classes)
        torch.testing.assert_close(z, torch.stack(module(ids, mask, torch.full((3,), task))))
        torch.testing.assert_close(module.task_logits(ids, mask, task), z)
    with pytest.raises(ConfigError, match="mixes tasks"):
        module.task_logits(ids, mask, torch.tensor([0, 1, 0]))


def test_per_task_text_batches_are_deterministic_dicts_of_one_task_each(tiny_setup):
    root, exp, _ = tiny_setup
    a, b = _batches(exp), _batches(exp)
    assert list(a) == TASKS
    for i, t in enumerate(TASKS):
        assert set(a[t]) == {"input_ids", "attention_mask", "labels", "task"} and len(a[t]["labels"]) == 4
        assert a[t]["task"].tolist() == [i] * 4
        assert torch.equal(a[t]["input_ids"], b[t]["input_ids"])
    assert _datamodule(exp).train_tasks == TASKS
    with pytest.raises(ConfigError, match="train_task is not supported"):
        _datamodule(exp, train_task="topic")


@pytest.mark.parametrize("granularity", ["task", "tensor"])
def test_wrapper_with_constant_coefficients_is_task_arithmetic(tiny_setup, tmp_path, granularity):
    """λ = 0.4 for every expert (and tensor): the wrapper's logits are those of the EncoderClassifier
    whose encoder is the task-arithmetic merge; the encoder-only export is that encoder."""
    from lightning_merge.examples.encoder import EncoderClassifier

    root, exp, experts = tiny_setup
    lm = _wrapped(exp, experts, granularity=granularity, init=0.4).eval()
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {"coefficients.values.lambda"}
    assert not any("heads" in n for n in lm.bank.names)  # the heads are not merged
    ref = exp.module().eval()
    ref.model.load_state_dict(merge_models(exp.base, experts, TaskArithmetic(lambda_=0.4)))
    for t, batch in _batches(exp).items():
        z = lm(**batch)  # labels are ignored by the adapter
        assert z.shape == (4, ref.heads[t].out_features)
        want = torch.stack(ref(batch["input_ids"], batch["attention_mask"], batch["task"]))
        torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    out = lm.export(tmp_path / "merged", target_only=True)
    assert (out / "config.json").is_file() and (out / "learned_coefficients" / "coefficients.png").stat().st_size > 1000
    loaded = EncoderClassifier(str(out), exp.heads).eval()
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("objective,granularity", [("entropy", "tensor"), ("entropy", "task"), ("dam", "column")])
def test_a_few_steps_change_only_the_coefficients(tiny_setup, tmp_path, objective, granularity):
    root, exp, experts = tiny_setup
    lm = _wrapped(exp, experts, granularity=granularity, objective=objective, lr=0.05)
    frozen = {k: v.clone() for k, v in lm.model.state_dict().items()}  # encoder and heads
    before = {k: v.detach().clone() for k, v in lm.coefficients.values.items()}
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert list(batch) == TASKS
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[Record()]))
    trainer.fit(lm, datamodule=_datamodule(exp))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, before[k]) for k, v in lm.coefficients.values.items())
    assert all(torch.equal(v, frozen[k]) for k, v in lm.model.state_dict().items())
    if objective == "dam":
        assert lm.expert_tasks == TASKS
        # validation of the merged model per task, through the same adapter (labelled val rows)
        per_loader = pl.Trainer(**trainer_kwargs(tmp_path)).validate(lm, datamodule=_datamodule(exp), verbose=False)
        metrics = {k: v for m in per_loader for k, v in m.items()}
        assert {f"val/{t}/acc" for t in TASKS} <= set(metrics) and 0.0 <= metrics["val/acc_mean"] <= 1.0
