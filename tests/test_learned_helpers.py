"""Tiny models shared by the learned-merge tests (imported by tests/test_learned*.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from zoo_helpers import save_zoo

from lightning_merge.lightning.data import TensorDictDataset

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False, num_labels=4)


def classifier(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**TINY)).eval()


def make_zoo(root: Path) -> dict[str, str]:
    """base/ and e0/, e1/ (full perturbed copies) and lora/ (a PEFT adapter on q/v)."""
    return save_zoo(root, classifier, (0.02, 0.04), lora_r=2)


def token_batches(n: int = 16, batch_size: int = 8, seed: int = 0, seq: int = 6) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (n, seq), generator=gen)
    data = TensorDictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, -1] % 4)
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path: Path, **kw) -> dict:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(tmp_path), deterministic=True)
    args.update(kw)
    return args


class DumpModel(pl.Callback):
    """Saves each rank's merged module state after validation (``<out>/model<rank>.safetensors``):
    what the DDP-equals-one-process tests compare."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in pl_module.model.state_dict().items()},
                  f"{self.out}/model{trainer.global_rank}.safetensors")
