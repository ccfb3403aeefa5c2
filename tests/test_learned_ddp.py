"""``LearnedMerge`` and ``SensMergeCallback`` in 2-process DDP on CPU (gloo, ddp_spawn, as in
tests/test_callback.py): the coefficients / factors are identical on both ranks and equal to a
1-process run over the same global batches."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_learned_helpers import make_zoo, token_batches, trainer_kwargs
from test_learned_sens import LitClassifier, sens_data

from lightning_merge.learned import LearnedMerge, SensMergeCallback


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("ddp_zoo"))


class RankShard(torch.utils.data.Sampler):
    """Rank r of w reads examples r, r + w, r + 2w, ... in order (Lightning's own distributed sampler
    shuffles training data), so the two ranks' batches together are the 1-process batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // 2


class DumpCoefficients(pl.Callback):
    """Each rank writes its coefficients (and the merge factors of a SensMergeCallback) at the end."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _dump(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file

        rank = trainer.global_rank
        if isinstance(pl_module, LearnedMerge):
            save_file({k: v.detach().contiguous() for k, v in pl_module.coefficients.values.items()},
                      str(Path(self.out) / f"rank{rank}.safetensors"))
        sens = [cb for cb in trainer.callbacks if isinstance(cb, SensMergeCallback)]
        if sens:
            (Path(self.out) / f"rank{rank}.json").write_text(json.dumps(sens[0].factors.sigma))
            save_file({k: v.detach().contiguous() for k, v in pl_module.model.state_dict().items()},
                      str(Path(self.out) / f"model{rank}.safetensors"))

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.training:
            self._dump(trainer, pl_module)


def test_ddp_coefficients_in_sync_and_equal_to_one_process(zoo, tmp_path):
    from safetensors.torch import load_file

    def module() -> LearnedMerge:
        return LearnedMerge(zoo["base"], [zoo["e0"], zoo["e1"], zoo["lora"]], granularity="tensor", lr=0.05)

    one = tmp_path / "one"
    one.mkdir()
    pl.Trainer(**trainer_kwargs(one, callbacks=[DumpCoefficients(str(one))], max_epochs=2)).fit(
        module(), token_batches(n=16, batch_size=8))
    two = tmp_path / "two"
    two.mkdir()
    data = token_batches(n=16).dataset
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=RankShard(16))
    pl.Trainer(**trainer_kwargs(two, callbacks=[DumpCoefficients(str(two))], max_epochs=2, devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False)).fit(module(), loader)
    r0, r1 = (load_file(str(two / f"rank{r}.safetensors")) for r in range(2))
    ref = load_file(str(one / "rank0.safetensors"))
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k  # identical on both ranks
        # each rank's mean loss over 4 of the 8 examples: the averaged gradient equals the 1-process one
        assert torch.allclose(r0[k], ref[k], atol=1e-6, rtol=0), (k, (r0[k] - ref[k]).abs().max())
        assert not torch.equal(ref[k], torch.full_like(ref[k], 0.3))


def test_ddp_sens_callback_same_factors_and_merge_on_every_rank(zoo, tmp_path):
    from safetensors.torch import load_file

    def cb() -> SensMergeCallback:
        return SensMergeCallback([zoo["e0"], zoo["e1"], zoo["lora"]], "ties", method_params={"density": 0.5},
                                 calibration_batches=1, target="model")

    one = tmp_path / "one"
    one.mkdir()
    pl.Trainer(**trainer_kwargs(one, callbacks=[cb(), DumpCoefficients(str(one))], limit_val_batches=1)).validate(
        LitClassifier(), datamodule=sens_data())
    two = tmp_path / "two"
    two.mkdir()
    pl.Trainer(**trainer_kwargs(two, callbacks=[cb(), DumpCoefficients(str(two))], limit_val_batches=1, devices=2,
                                strategy="ddp_spawn")).validate(LitClassifier(), datamodule=sens_data())
    sigma = [json.loads((d / f"rank{r}.json").read_text()) for d, r in ((one, 0), (two, 0), (two, 1))]
    assert sigma[0] == sigma[1] == sigma[2]
    models = [load_file(str(d / f"model{r}.safetensors")) for d, r in ((one, 0), (two, 0), (two, 1))]
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]) and torch.equal(models[1][k], models[2][k]), k
