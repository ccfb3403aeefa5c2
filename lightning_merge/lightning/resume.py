"""Whether the running Trainer call restores a checkpoint in which this merge already happened.

The checkpoint path of the running call is a local variable of ``Trainer._run`` at ``setup`` time
(``trainer.ckpt_path`` is only set later, in ``_CheckpointConnector.resume_start``):
:func:`pending_ckpt_path` reads it from the caller's frame (read-only) and
:func:`peek_callback_state` reads one callback's state from the checkpoint without its tensor data.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

#: the non-tensor part of a distributed checkpoint folder (``ModelParallelStrategy``,
#: ``save_distributed_checkpoint=True``): it holds the callbacks' states
DISTRIBUTED_METADATA = "meta.pt"


def pending_ckpt_path(trainer: pl.Trainer) -> tuple[bool, Any]:
    """(found, path) of the checkpoint the running Trainer call restores after ``setup``.

    The path is the ``ckpt_path`` local of ``Trainer._run`` (already resolved from "last", "best",
    "hpc"); ``trainer.ckpt_path`` is not set before ``resume_start``, after setup.
    """
    code = pl.Trainer._run.__code__
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is code and frame.f_locals.get("self") is trainer:
                return True, frame.f_locals.get("ckpt_path")
            frame = frame.f_back
    finally:
        del frame
    return False, None


def peek_callback_state(path: Any, key: str) -> dict | None:
    """``checkpoint["callbacks"][key]`` of a local checkpoint file, or of a distributed checkpoint
    folder's ``meta.pt``, without reading tensor data.
    None when absent or unreadable (the caller then merges and the restored weights win)."""
    try:
        p = Path(os.fspath(path))
        if p.is_dir() and (p / DISTRIBUTED_METADATA).is_file():  # a distributed checkpoint folder
            p = p / DISTRIBUTED_METADATA
        if not p.is_file():
            return None
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # remote/legacy/non-weights-only checkpoints: not an error, just no peek
        log.debug("MergeCallback: cannot peek at %s (%s); merging, the restored weights will win", path, e)
        return None
    state = (ckpt.get("callbacks") or {}).get(key) if isinstance(ckpt, Mapping) else None
    return dict(state) if isinstance(state, Mapping) else None
