"""Turn whatever the user passes as a model (path, module, state dict, source) into a :class:`Source`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SourceError
from .base import ModuleSource, Source, StateDictSource
from .files import HF_WEIGHT_FILES, TORCH_SUFFIXES, HFFolderSource, SafetensorsFileSource, TorchFileSource
from .lora import ADAPTER_CONFIG, LoraAdapterSource

log = logging.getLogger(__name__)

ACCEPTED = (
    "a PEFT LoRA adapter folder (with adapter_config.json), "
    f"a Hugging Face model folder (with one of {', '.join(HF_WEIGHT_FILES)}), "
    "a sharded index file (*.index.json), a .safetensors file, "
    f"a torch/Lightning checkpoint ({', '.join('*' + s for s in TORCH_SUFFIXES)}), "
    "an nn.Module, a state dict (name -> tensor mapping) or a Source"
)


def open_source(spec: Any, *, label: str | None = None) -> Source:
    """Open ``spec`` as a lazy :class:`Source`.

    Accepts (in this order): a :class:`Source` (returned as is, ``label`` ignored); an ``nn.Module``
    (:class:`ModuleSource`); a ``Mapping[str, Tensor]`` (:class:`StateDictSource`); or a path
    (``str`` / ``os.PathLike``):

    * a folder with ``adapter_config.json`` -> :class:`LoraAdapterSource`;
    * a folder with HF weights, or a ``*.index.json`` file -> :class:`HFFolderSource`;
    * ``*.safetensors`` -> :class:`SafetensorsFileSource`;
    * ``*.ckpt`` / ``*.bin`` / ``*.pt`` / ``*.pth`` -> :class:`TorchFileSource`.

    Raises :class:`SourceError` naming the path and listing what is accepted for anything else.
    """
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, nn.Module):
        return ModuleSource(spec, label=label or f"<{type(spec).__name__}>")
    if isinstance(spec, Mapping):
        return StateDictSource(spec, label=label or "<state dict>")
    if not isinstance(spec, (str, os.PathLike)):
        raise SourceError(f"cannot open a {type(spec).__name__} as a model; pass {ACCEPTED}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(
            f"{path}: no such file or folder. Pass {ACCEPTED}; a Hub model id must be downloaded first "
            "(e.g. huggingface_hub.snapshot_download) and given as a local folder"
        )
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return LoraAdapterSource(path, label=label)
        if any((path / n).is_file() for n in HF_WEIGHT_FILES):
            return HFFolderSource(path, label=label)
        present = sorted(p.name for p in path.iterdir())[:15]
        raise SourceError(f"{path}: folder holds no model or adapter weights ({present}); pass {ACCEPTED}")
    name = path.name.lower()
    if name == ADAPTER_CONFIG:
        return LoraAdapterSource(path.parent, label=label)
    if name.endswith(".index.json"):
        return HFFolderSource(path, label=label)
    if name.endswith(".safetensors"):
        return SafetensorsFileSource(path, label=label)
    if name.endswith(TORCH_SUFFIXES):
        return TorchFileSource(path, label=label)
    raise SourceError(f"{path}: unrecognized file type '{path.suffix}'; pass {ACCEPTED}")
