"""Checkpoint files on disk: safetensors files, Hugging Face model folders, torch / Lightning checkpoints.

Every source here reads only *headers* when it is opened, and one tensor per :meth:`get` call:

* :class:`SafetensorsFileSource`: one ``.safetensors`` file, read tensor by tensor with ``pread``
  (no memory map: a file truncated mid-merge is an error, not a SIGBUS). The header is validated at
  open time, so a truncated or corrupted file fails there, naming the file.
* :class:`TorchFileSource`: ``.bin`` / ``.pt`` / ``.pth`` files and Lightning ``.ckpt`` checkpoints,
  through ``torch.load(mmap=True, weights_only=True)``: tensor data stays on disk until used.
  A Lightning checkpoint's ``"state_dict"`` entry is used; its key prefixes (``model.`` for a
  LightningModule holding the network as ``self.model``) are later mapped to the base's names by
  :func:`~lightning_merge.sources.base.align`.
* :class:`HFFolderSource`: a Hugging Face model folder (``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded index). Every shard listed by
  an index must exist when the folder is opened.

All of them return tensors on CPU in their stored dtype (``space == "weight"``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import SourceError
from .base import Source

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: safetensors dtype codes -> torch dtypes (those the installed torch knows)
_ST_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "U16": "uint16", "U32": "uint32", "U64": "uint64",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}

#: HF weight files, in order of preference
HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
#: entries of a checkpoint dict that may hold the model's state dict, tried in this order
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _missing_key(label: str, key: str, keys: list[str]) -> SourceError:
    return SourceError(
        f"{label}: has no tensor '{key}' (it holds {len(keys)} tensors, e.g. {keys[:3]}); "
        "ask only for names listed by keys()"
    )


# --------------------------------------------------------------------------------------- safetensors

#: element sizes of the safetensors dtype codes
_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for code, dt in _ST_DTYPES.items()}


def _read_safetensors_header(
    path: Path,
) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns ``name -> (dtype code, shape, begin, end)`` in storage order (byte offsets into the data
    section), the metadata, and where the data section starts. Every entry must have a known dtype,
    a byte range that matches its shape and lies inside the file: a truncated or corrupted file
    fails here, naming the file and the first tensor at fault."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SourceError(
                f"{path}: {size} bytes is too short for a safetensors file; re-save or re-download it"
            )
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise SourceError(
                f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or is not "
                "safetensors; re-save or re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{path}: corrupted safetensors header ({e}); re-save or re-download it") from e
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupted safetensors header (not a JSON object); re-save or re-download it")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    try:
        ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in ordered:
            code, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            entries[name] = (code, shape, begin, end)
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{path}: corrupted safetensors header (bad entry: {e}); re-save or re-download it") \
            from None
    unknown = {code for code, *_ in entries.values() if code not in _ST_DTYPES}
    if unknown:
        raise SourceError(
            f"{path}: dtypes {sorted(unknown)} are not supported by the installed torch; "
            "convert the file to a standard float dtype"
        )
    for name, (code, shape, begin, end) in entries.items():
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _ITEMSIZE[code] or begin < 0:
            raise SourceError(f"{path}: tensor '{name}' spans bytes {begin}-{end}, which does not match its shape "
                              f"{list(shape)} ({code}); the file is corrupted: re-save or re-download it")
        if end > data_size:
            raise SourceError(f"{path}: tensor '{name}' ends at byte {end} of the data, but the file holds only "
                              f"{data_size}; the file is truncated: re-save or re-download it")
    return entries, meta, data_start


class SafetensorsFileSource(Source):
    """One ``.safetensors`` file, read lazily: one tensor per :meth:`get`, with ``pread``.

    The header is parsed and validated when the source is created: a missing, truncated or corrupted
    file raises :class:`SourceError` naming the file. ``metadata`` holds the file's ``__metadata__``.

    Tensors are read into fresh memory with positional reads, not through a memory map: a file
    that is truncated or replaced while a merge reads it gives a :class:`SourceError` naming it (a
    short read, or a size or modification time that changed since the file was opened), where a
    memory map would kill the process with SIGBUS. The tensors are the caller's to modify.
    """

    fresh_tensors = True

    def __init__(self, path: PathLike, label: str | None = None):
        self.path = Path(path).expanduser()
        self.label = label or str(self.path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such safetensors file; check the path")
        self._fd: int | None = None
        self._header, self.metadata, self._data_start = _read_safetensors_header(self.path)
        st = self.path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)
        #: tensor bytes read so far (shard-local reads read only their rows)
        self.bytes_read = 0

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise SourceError(f"{self.path}: cannot be opened ({e.strerror}); check the path and permissions") \
                    from None
            st = os.fstat(self._fd)
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                self._changed(st.st_size)
        return self._fd

    def _changed(self, size: int) -> None:
        raise SourceError(
            f"{self.path}: the file changed on disk while it was being merged (size {self._stamp[0]} -> {size} "
            "bytes, or a new modification time); nothing was written. Rerun once the file is complete and "
            "no other program writes it"
        )

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, key: str) -> bool:
        return key in self._header

    def _entry(self, key: str) -> tuple[str, tuple[int, ...], int, int]:
        try:
            return self._header[key]
        except KeyError:
            raise _missing_key(self.label, key, self.keys()) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._entry(key)[0]]

    def get(self, key: str) -> Tensor:
        code, shape, begin, end = self._entry(key)
        return self._read(key, shape, _ST_DTYPES[code], begin)

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``key``, reading only their bytes (rows are contiguous)."""
        code, shape, begin, end = self._entry(key)
        if not shape:
            return self.get(key)
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(stop, start)
        row = (end - begin) // shape[0] if shape[0] else 0
        return self._read(key, (stop - start, *shape[1:]), _ST_DTYPES[code], begin + start * row)

    def _read(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, begin: int) -> Tensor:
        fd = self._open()
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            done, offset = 0, self._data_start + begin
            while done < len(buf):
                try:
                    n = os.preadv(fd, [buf[done:]], offset + done)
                except OSError as e:
                    raise SourceError(f"{self.path}: reading tensor '{key}' failed ({e.strerror}); check the disk "
                                      "and rerun") from None
                if n == 0:
                    self._changed(os.fstat(fd).st_size)
                done += n
            self.bytes_read += len(buf)
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            self._changed(st.st_size)
        return t

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 (interpreter shutdown)
            pass

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawned workers: reopen lazily
        state = dict(self.__dict__)
        state["_fd"] = None
        return state


# ------------------------------------------------------------------------------------- torch files

def _unpickling_hint(e: BaseException) -> str:
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    return " ".join(text.split())[:300]


def _load_torch(path: Path, weights_only: bool) -> Any:
    """``torch.load`` on CPU, memory-mapped when the file is in the zip format (torch >= 1.6)."""
    if zipfile.is_zipfile(path):
        mmap = True
    else:
        with open(path, "rb") as f:
            magic = f.read(2)
        if not magic.startswith(b"\x80"):
            raise SourceError(
                f"{path}: is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle); "
                "expected a file written by torch.save or Trainer.save_checkpoint"
            )
        mmap = False
        log.warning("%s: legacy (pre-1.6) torch format cannot be memory-mapped; it is read into memory", path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only:
            raise SourceError(
                f"{path}: holds pickled Python objects that torch.load(weights_only=True) refuses "
                f"({_unpickling_hint(e)}). If you trust this file, open it with "
                "TorchFileSource(path, weights_only=False), or re-save only its state_dict"
            ) from e
        raise SourceError(f"{path}: is not a readable PyTorch checkpoint ({e}); re-save it") from e
    except Exception as e:
        raise SourceError(
            f"{path}: torch.load failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            "the file is truncated, corrupted or not a PyTorch checkpoint"
        ) from e


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _find_state_dict(
    obj: Any, path: Path, state_dict_key: str | None
) -> tuple[str | None, Mapping[str, Any]]:
    """Locate the name -> tensor mapping inside a loaded checkpoint object."""
    if isinstance(obj, torch.nn.Module):
        return None, obj.state_dict()
    if not isinstance(obj, Mapping):
        raise SourceError(
            f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict; "
            "save model.state_dict() (or use Trainer.save_checkpoint) instead"
        )
    if state_dict_key is not None:
        if state_dict_key not in obj or not _is_tensor_map(obj[state_dict_key]):
            raise SourceError(
                f"{path}: has no state dict under '{state_dict_key}' (top-level entries: {list(obj)[:10]}); "
                "pass the entry that holds the weights as state_dict_key"
            )
        return state_dict_key, obj[state_dict_key]
    for k in STATE_DICT_KEYS:
        if _is_tensor_map(obj.get(k)):
            return k, obj[k]
    if _is_tensor_map(obj):
        return None, obj
    raise SourceError(
        f"{path}: found no tensors in entries {list(STATE_DICT_KEYS)} nor at the top level "
        f"(top-level entries: {list(obj)[:10]}); pass state_dict_key=... naming the entry that holds "
        "the weights"
    )


class TorchFileSource(Source):
    """A torch-pickled state dict: ``pytorch_model.bin``, ``.pt`` / ``.pth``, or a Lightning ``.ckpt``.

    The file is loaded with ``torch.load(map_location="cpu", mmap=True, weights_only=True)``, so tensor
    data stays on disk until a tensor is used. The weights are taken from the first of
    ``"state_dict"`` (Lightning), ``"model_state_dict"``, ``"model"``, ``"module"`` that holds tensors,
    else from the top level (a plain state dict); ``state_dict_key`` picks the entry explicitly.
    Non-tensor entries inside the state dict (e.g. ``_extra_state``) are skipped with a warning.

    Args:
        path: the file.
        label: name used in messages (default: the path).
        weights_only: forwarded to ``torch.load``; set ``False`` only for files you trust (checkpoints
            whose hyperparameters hold custom classes need it).
        state_dict_key: the checkpoint entry that holds the weights (default: automatic).
    """

    def __init__(
        self,
        path: PathLike,
        label: str | None = None,
        *,
        weights_only: bool = True,
        state_dict_key: str | None = None,
    ):
        self.path = Path(path).expanduser()
        self.label = label or str(self.path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such checkpoint file; check the path")
        self.weights_only = weights_only
        self.state_dict_key = state_dict_key
        self._t: dict[str, Tensor] | None = None
        self._load()

    def _load(self) -> dict[str, Tensor]:
        if self._t is None:
            obj = _load_torch(self.path, self.weights_only)
            entry, sd = _find_state_dict(obj, self.path, self.state_dict_key)
            skipped = [k for k, v in sd.items() if not isinstance(v, Tensor)]
            if skipped:
                log.warning("%s: skipped %d non-tensor entries of the state dict (e.g. %s)",
                            self.label, len(skipped), skipped[:3])
            self._t = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
            self.entry = entry
            if entry is not None:
                log.debug("%s: weights taken from the checkpoint's '%s' entry", self.label, entry)
        return self._t

    def keys(self) -> list[str]:
        return list(self._load())

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def _tensor(self, key: str) -> Tensor:
        t = self._load()
        if key not in t:
            raise _missing_key(self.label, key, list(t))
        return t[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def get(self, key: str) -> Tensor:
        return self._tensor(key).detach()

    def close(self) -> None:
        self._t = None

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawned workers: reload (mmap) lazily
        state = dict(self.__dict__)
        state["_t"] = None
        return state


# ---------------------------------------------------------------------------------------- HF folder

def _open_file(path: Path, label: str | None = None) -> Source:
    if path.name.endswith(".safetensors"):
        return SafetensorsFileSource(path, label=label)
    return TorchFileSource(path, label=label)


class HFFolderSource(Source):
    """A Hugging Face model folder saved by ``save_pretrained`` (single file or sharded).

    Looks for, in this order, ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``. ``path`` may also be an index file itself.
    Every shard named by an index is opened (headers only) at construction: a missing shard or a
    tensor the index places in a shard that lacks it raises :class:`SourceError` naming both.
    ``config_dir`` is the folder (config, tokenizer and generation files for HF outputs).
    """

    def __init__(self, path: PathLike, label: str | None = None):
        p = Path(path).expanduser()
        if p.is_file() and p.name.endswith(".index.json"):
            folder, weights = p.parent, p
        elif p.is_dir():
            folder = p
            found = [folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()]
            if not found:
                present = sorted(x.name for x in folder.iterdir())[:15]
                raise SourceError(
                    f"{folder}: no model weights found; expected one of {list(HF_WEIGHT_FILES)} "
                    f"(the folder holds {present}); save the model with save_pretrained"
                )
            weights = found[0]
            if len(found) > 1:
                log.debug("%s: several weight files %s, using %s",
                          folder, [f.name for f in found], weights.name)
        else:
            raise SourceError(f"{p}: no such model folder; check the path")
        self.folder = folder
        self.weights_file = weights
        self.label = label or str(folder)
        self.config_dir = str(folder)
        self._files: list[Source] = []
        self._where: dict[str, Source] = {}
        if weights.name.endswith(".index.json"):
            self._open_index(weights)
        else:
            src = _open_file(weights)
            self._files.append(src)
            self._where = {k: src for k in src.keys()}
        self.fresh_tensors = all(f.fresh_tensors for f in self._files)

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceError(
                f"{index}: not a valid shard index ({type(e).__name__}: {e}); it must be JSON with a "
                "'weight_map' object (tensor name -> shard file); re-save the model"
            ) from e
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (self.folder / s).is_file()]
        if missing:
            raise SourceError(
                f"{index}: lists shard file(s) {missing} that are missing from {self.folder}; "
                "the download or copy is incomplete, fetch those shards again"
            )
        opened: dict[str, Source] = {}
        for s in shards:
            opened[s] = _open_file(self.folder / s, label=f"{self.folder / s}")
            self._files.append(opened[s])
        for name, shard in weight_map.items():
            src = opened[shard]
            if name not in src:
                raise SourceError(
                    f"{index}: places tensor '{name}' in shard {shard}, which does not hold it; "
                    "the index and the shards come from different saves, re-save or re-download the model"
                )
            self._where[name] = src

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _src(self, key: str) -> Source:
        try:
            return self._where[key]
        except KeyError:
            raise _missing_key(self.label, key, self.keys()) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._src(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._src(key).dtype(key)

    def get(self, key: str) -> Tensor:
        return self._src(key).get(key)

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        return self._src(key).get_rows(key, start, stop)

    def close(self) -> None:
        for f in self._files:
            f.close()
