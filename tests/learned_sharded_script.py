"""``LearnedMerge`` fitted under a real ``Trainer(strategy=ModelParallelStrategy(...))`` on CPU (gloo).
Run as a script (Lightning's launcher starts the other ranks by running it again). Usage:
``python learned_sharded_script.py ZOO_DIR OUT_DIR WORLD GRANULARITY OBJECTIVE [resume]``, or
``python learned_sharded_script.py ZOO_DIR OUT_DIR WORLD sens``: a SensMergeCallback calibrating
and merging into the sharded classifier in ``validate`` (factors and merged weights written).

Every rank reads examples r, r + W, ... of the 12 (so the ranks' batches together are the
1-process batch of 6), fits 2 epochs (3 with ``resume``, continuing from the distributed
checkpoint folder of the 2-epoch run), writes its coefficients, its bank's footprint, what
:class:`Recorded` saw of the meta-device load and, on rank 0, the exported merged model."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from test_learned_helpers import token_batches

from lightning_merge.learned import LearnedMerge


class RankShard(torch.utils.data.Sampler):
    """Rank r of w reads examples r, r + w, ... in order."""

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def _where() -> tuple[int, int]:
        import torch.distributed as dist

        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._where()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // self._where()[1]


class Dump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        save_file({k: v.detach().contiguous() for k, v in pl_module.coefficients.values.items()},
                  str(self.out / f"rank{rank}.safetensors"))
        (self.out / f"bank{rank}.json").write_text(json.dumps({**pl_module.bank.nbytes(),
                                                               "sharded": pl_module.bank.sharded}))


class Recorded(LearnedMerge):
    """Writes ``meta{rank}.json`` at its first ``configure_model``: whether every parameter of the
    wrapped model was on meta (and every buffer real) at the start, and after the setup whether
    each rank's local shards equal the rows of the folder's tensors (numels: this rank's, the model's)."""

    def configure_model(self) -> None:
        from lightning_merge.lightning.sharded import local_box
        from lightning_merge.sources.resolve import open_source
        from lightning_merge.targets.module import is_dtensor, local_part

        first = not self.bank.loaded
        record = {"meta_at_start": all(p.is_meta for p in self.model.parameters()),
                  "buffers_real": all(not b.is_meta for b in self.model.buffers())}
        super().configure_model()
        if not first:
            return
        rank, world = RankShard._where()
        src = open_source(self.model_path)
        equal, local_numel, full_numel = [], 0, 0
        for name, p in self.model.named_parameters():
            local = local_part(p).detach().cpu()
            box = local_box(p, rank, world) if is_dtensor(p) else None
            if not is_dtensor(p):
                want = src.get(name)
            else:
                want = src.get_rows(name, box[0].start, box[0].stop) if box is not None else src.get(name)[:0]
            equal.append(not local.is_meta and torch.equal(local, want.to(local.dtype)))
            local_numel, full_numel = local_numel + local.numel(), full_numel + p.numel()
        src.close()
        record.update(rows_equal=all(equal), tensors=len(equal), local_numel=local_numel, full_numel=full_numel,
                      sharded=self._sharded)
        (self.record_dir / f"meta{rank}.json").write_text(json.dumps(record))


class PerTask(torch.utils.data.Dataset):
    """{task: example} items (the dam objective pairs each expert with its task's batch)."""

    def __init__(self, base, tasks) -> None:
        self.base, self.tasks = base, tasks

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return {t: self.base[(i + k) % len(self.base)] for k, t in enumerate(self.tasks)}


def main(zoo: Path, out: Path, world: int, granularity: str, objective: str, resume: bool) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    experts = [str(zoo / "e0"), str(zoo / "e1"), str(zoo / "lora")]
    data = token_batches(n=12).dataset
    tasks = ["a", "b", "c"]
    if objective == "dam":
        data = PerTask(data, tasks)
    loader = torch.utils.data.DataLoader(data, batch_size=6 // world, sampler=RankShard(12))
    module = Recorded(str(zoo / "base"), experts, granularity=granularity, objective=objective, lr=0.05,
                          expert_tasks=tasks if objective == "dam" else None, kl_normalization="per_token",
                          export_dir=str(out / "export"), overwrite=True)
    module.record_dir = out
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True)
    sharded = world > 1 or os.environ.get("LM_FORCE_MP")  # LM_FORCE_MP=1: the sharded code path on 1 rank
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if sharded else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=3 if resume else 2,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False, deterministic=True,
                         callbacks=[Dump(out), ckpt], default_root_dir=str(out))
    trainer.fit(module, train_dataloaders=loader,
                ckpt_path=str(out.parent / "first" / "ckpt" / "last.ckpt") if resume else None)


class Classifier(pl.LightningModule):
    """The tiny classifier, sharded (blocks, then the model) when the strategy gives a mesh."""

    def __init__(self) -> None:
        super().__init__()
        from test_learned_helpers import classifier

        self.model = classifier(0)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)


class DumpWeights(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
              for k, v in pl_module.model.state_dict().items()}
        if trainer.is_global_zero:
            save_file(sd, str(self.out / "merged.safetensors"))


def main_sens(zoo: Path, out: Path, world: int) -> None:
    from test_learned_sens import sens_data

    from lightning_merge.learned import SensMergeCallback

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    cb = SensMergeCallback([str(zoo / "e0"), str(zoo / "e1"), str(zoo / "lora")], "ties",
                           method_params={"density": 0.5}, calibration_batches=2, temperature=0.5,
                           factors_out=str(out / "factors.json"), target="model")
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, callbacks=[cb, DumpWeights(out)],
                         default_root_dir=str(out))
    trainer.validate(Classifier(), datamodule=sens_data())


if __name__ == "__main__" and sys.argv[4] == "sens":
    main_sens(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
elif __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
         len(sys.argv) > 6 and sys.argv[6] == "resume")
