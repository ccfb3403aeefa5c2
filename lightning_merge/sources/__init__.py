"""Lazy tensor sources: checkpoints, HF folders, Lightning .ckpt, PEFT LoRA adapters, live modules."""

from .base import ModuleSource, RenamedSource, Source, StateDictSource, align
from .files import HFFolderSource, SafetensorsFileSource, TorchFileSource
from .lora import LoraAdapterSource, LoraModule
from .resolve import open_source

__all__ = [
    "HFFolderSource",
    "LoraAdapterSource",
    "LoraModule",
    "ModuleSource",
    "RenamedSource",
    "SafetensorsFileSource",
    "Source",
    "StateDictSource",
    "TorchFileSource",
    "align",
    "open_source",
]
