"""A real ``Trainer(strategy=ModelParallelStrategy(...))`` run on CPU (gloo) with a MergeCallback
into an FSDP2 module built on the meta device in ``configure_model``. Run as a script: Lightning's
launcher starts the other ranks by running it again. Usage:
``python sharded_fit_script.py MODE ZOO_DIR OUT_DIR WORLD`` with MODE validate | fit | resume | search."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file, save_file
from sharded_workers import Net, full_state
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import MergeCallback, MergeSearch, Ties

#: the search's candidates (the test merges each the same way in one process)
CANDIDATES = [{"method": "ties", "density": 0.5}, {"method": "task_arithmetic", "lambda": 0.3},
              {"method": "dare_ties", "density": 0.5}, {"method": "della", "density": 0.6},
              {"method": "adaptive_rms"}]


class Sharded(L.LightningModule):
    def __init__(self, base: str):
        super().__init__()
        self.base, self.net = base, None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        with torch.device("meta"):
            net = Net()
        for block in net.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
        net.to_empty(device="cpu")
        set_model_state_dict(net, load_file(self.base), options=StateDictOptions(full_state_dict=True))
        self.net = net

    def _loss(self, batch):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self.net(ids), y)

    def training_step(self, batch, i):
        return self._loss(batch)

    def validation_step(self, batch, i):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Dump(Callback):
    """Rank 0 writes the full weights at the given hooks (every rank joins the collective)."""

    def __init__(self, out: Path, prefix: str):
        self.out, self.prefix = out, prefix

    def _dump(self, trainer, module, what):
        sd = full_state(module.net)
        if trainer.is_global_zero:
            save_file(sd, str(self.out / f"{self.prefix}_{what}.safetensors"))

    def on_train_start(self, trainer, module):
        self._dump(trainer, module, "train_start")

    def on_train_end(self, trainer, module):
        self._dump(trainer, module, "train_end")

    def on_validation_end(self, trainer, module):
        if not trainer.training and not trainer.sanity_checking:
            self._dump(trainer, module, "validated")


def main(mode: str, zoo: Path, out: Path, world: int) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 50, (48, 5), generator=gen), torch.randint(0, 2, (48,), generator=gen))
    loader = DataLoader(data, batch_size=8)
    experts = [str(zoo / "e0.safetensors"), str(zoo / "e1.safetensors")]
    if mode == "search":
        merge = MergeSearch(experts=experts, candidates=CANDIDATES, monitor="val_loss", mode="min", target="net",
                            seed=3, csv_path=str(out / f"search_{world}.csv"))
    else:
        merge = MergeCallback(experts=experts, method=Ties(density=0.5), target="net", seed=3)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=ModelParallelStrategy(data_parallel_size=world,
                                                                                             tensor_parallel_size=1),
                        callbacks=[merge, ckpt, Dump(out, f"{mode}{world}" if mode == "search" else mode)],
                        max_steps={"fit": 3, "search": 2}.get(mode, 6), logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=1.0 if mode == "search" else 2)
    module = Sharded(str(zoo / "base.safetensors"))
    if mode == "validate":
        trainer.validate(module, dataloaders=loader)
    elif mode in ("fit", "search"):
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    else:
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=str(out / "ckpt" / "last.ckpt"))
    if trainer.is_global_zero and mode == "search":
        import json

        (out / f"search{world}.json").write_text(json.dumps({"best_index": merge.best_index, "scores": [
            r["score"] for r in merge.results]}))
    elif trainer.is_global_zero:
        (out / f"{mode}_merge_state.txt").write_text(f"merged={merge.merged} skipped_for={merge._skipped_for}\n")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
