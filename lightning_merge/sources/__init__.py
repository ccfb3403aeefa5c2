"""Lazy tensor sources: checkpoints, HF folders, Lightning .ckpt, PEFT LoRA adapters, live modules."""

from .base import ModuleSource, RenamedSource, Source, StateDictSource, align

__all__ = ["ModuleSource", "RenamedSource", "Source", "StateDictSource", "align"]
