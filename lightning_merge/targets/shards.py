"""Safetensors writers: streamed shards (with the Hugging Face index) and single files.

Everything here consumes a *stream* of ``(name, tensor)`` pairs (what
:func:`lightning_merge.engine.run_plan` yields) and holds at most one shard of it in memory; with
the stream's layout known up front, nothing is buffered at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError, MergeError
from .atomic import OutputExistsError, PathLike, _fsync_dir, _fsync_file, atomic_output_file, shown, writes

log = logging.getLogger(__name__)

TensorStream = Iterable[tuple[str, Tensor]]
#: the tensors a stream will yield, in order: (name, shape, dtype)
Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]
_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FINAL_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _prepare(name: str, t: object, names: set[str]) -> Tensor:
    """Check one stream item; return it detached, on CPU and contiguous."""
    if not isinstance(t, Tensor):
        raise MergeError(f"tensor stream item '{name}' is a {type(t).__name__}, not a tensor; "
                         "yield (name, torch.Tensor) pairs")
    if not isinstance(name, str) or not name:
        raise MergeError(f"tensor stream yielded a tensor under the name {name!r}; "
                         "names must be non-empty str")
    if name in names:
        raise MergeError(f"tensor '{name}' appears twice in the stream; each name may be written once")
    names.add(name)
    return t.detach().to("cpu").contiguous()


def _unshare(pending: dict[str, Tensor], t: Tensor) -> Tensor:
    """safetensors refuses tensors that share storage (e.g. tied weights): give ``t`` its own."""
    ptr = t.untyped_storage().data_ptr()
    if ptr and any(p.untyped_storage().data_ptr() == ptr for p in pending.values()):
        return t.clone()
    return t


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"safetensors metadata entry {k!r}: {v!r} is not str -> str; "
                              "convert the value with str() or json.dumps()")
        meta[k] = v
    return meta


def _nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _plan_shards(layout: Layout, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype, int]]]:
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = []
    current: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
    size_now = 0
    for name, shape, dtype in layout:
        if dtype not in _ST_DTYPE:
            raise ConfigError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
        size = _nbytes_of(shape, dtype)
        if current and size_now + size > max_shard_bytes:
            shards.append(current)
            current, size_now = [], 0
        current.append((name, tuple(int(d) for d in shape), dtype, size))
        size_now += size
    if current:
        shards.append(current)
    return shards


def _write_streamed_file(path: Path, entries, stream: Iterator[tuple[str, Tensor]], meta: dict[str, str]) -> None:
    """Write one safetensors file whose header is known up front, taking tensor bytes from ``stream``.

    The safetensors layout is an 8-byte little-endian header length, the JSON header (offsets of
    every tensor, padded with spaces to 8 bytes) and the raw little-endian tensor bytes in offset
    order; so with the names, shapes and dtypes known, each tensor is written the moment it exists
    and nothing is buffered.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, shape, dtype, size in entries:
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if meta:
        header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with writes(path):
        f = open(path, "wb")
    with f:
        with writes(path):
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
        for name, shape, dtype, _size in entries:
            try:
                got, t = next(stream)
            except StopIteration:
                raise MergeError(f"the tensor stream ended before '{name}' (expected by the output layout)") from None
            if got != name or not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                what = f"{type(t).__name__}" if not isinstance(t, Tensor) else f"{list(t.shape)} {t.dtype}"
                raise MergeError(f"the tensor stream gave '{got}' ({what}) where the output layout expects "
                                 f"'{name}' ({list(shape)} {dtype}); the stream must follow the layout's order")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            with writes(path):
                f.write(memoryview(data))
        with writes(path):
            f.flush()
            os.fsync(f.fileno())


def save_safetensors_shards(
    tensors: TensorStream,
    directory: PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    layout: Layout | None = None,
) -> list[str]:
    """Stream ``(name, tensor)`` pairs into safetensors shards in ``directory``; return the file names.

    With ``layout`` (every (name, shape, dtype) the stream will yield, in order, e.g. from the merge
    plan), shard headers are written first and each tensor's bytes go to disk as soon as it
    arrives: nothing is buffered. Without it, tensors are held until their shard is full.

    Shards hold at most ``max_shard_bytes`` of tensor data (a single larger tensor gets a shard of
    its own). One shard is written as ``model.safetensors``; more as
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (Hugging Face's
    format: ``weight_map`` and ``metadata.total_size``), so ``from_pretrained`` loads the folder.
    Tensors are held only until their shard is written (peak memory about one shard). Shards are
    written under provisional names and renamed once N is known; if the stream raises, the files
    written so far are removed and the exception propagates.

    ``metadata`` (str -> str) is stored in every shard's header next to ``{"format": "pt"}``.
    This writes into ``directory`` in place; for an all-or-nothing folder use :func:`save_hf_folder`
    or :func:`atomic_output_dir`.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes!r} must be a positive int (bytes per shard)")
    meta = _check_metadata(metadata)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    clash = [p.name for p in out.iterdir()
             if p.name in (SINGLE_FILE, INDEX_FILE) or _FINAL_SHARD.match(p.name)]
    if clash:
        raise OutputExistsError(f"'{out}' already holds model files {sorted(clash)[:3]}; write into an "
                                "empty directory (save_hf_folder does this atomically)")

    token = secrets.token_hex(4)
    provisional: list[Path] = []
    created: list[Path] = []  # final names, removed too if a later step fails
    weight_map: dict[str, int] = {}  # name -> shard number (0-based)
    pending: dict[str, Tensor] = {}
    pending_bytes = total_bytes = total_params = 0
    names: set[str] = set()

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = out / f".model-part-{len(provisional):05d}-{token}.safetensors.partial"
        provisional.append(path)
        with writes(path):
            save_file(pending, str(path), metadata=meta)
        _fsync_file(path)
        log.debug("wrote shard %d (%d tensors, %.1f MB)", len(provisional), len(pending), pending_bytes / 1e6)
        pending, pending_bytes = {}, 0

    try:
        if layout is not None:
            planned = _plan_shards(layout, max_shard_bytes)
            stream = iter(tensors)
            for entries in planned:
                path = out / f".model-part-{len(provisional):05d}-{token}.safetensors.partial"
                provisional.append(path)
                _write_streamed_file(path, entries, stream, meta)
                for name, _, _, size in entries:
                    weight_map[name] = len(provisional) - 1
                    total_bytes += size
                total_params += sum(_numel(e[1]) for e in entries)
            extra = next(stream, None)
            if extra is not None:
                raise MergeError(f"the tensor stream gave '{extra[0]}', which the output layout does not list")
        for name, raw in () if layout is not None else tensors:
            t = _prepare(name, raw, names)
            size = _nbytes(t)
            if pending and pending_bytes + size > max_shard_bytes:
                flush()
            pending[name] = _unshare(pending, t)
            weight_map[name] = len(provisional)
            pending_bytes += size
            total_bytes += size
            total_params += t.numel()
        if pending:
            flush()
        if not provisional:
            raise MergeError(f"the tensor stream for '{out}' was empty: nothing to save; "
                             "check that the merge plan selects at least one tensor")
        n = len(provisional)
        files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for src, dst in zip(provisional, files, strict=True):
            with writes(out / dst):
                os.replace(src, out / dst)
            created.append(out / dst)
        if n > 1:
            index = {
                "metadata": {"total_size": total_bytes, "total_parameters": total_params},
                "weight_map": {k: files[weight_map[k]] for k in sorted(weight_map)},
            }
            created.append(out / INDEX_FILE)
            with writes(out / INDEX_FILE):
                (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            _fsync_file(out / INDEX_FILE)
    except BaseException:
        for p in provisional + created:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    _fsync_dir(out)
    log.debug("wrote %d tensors (%.1f MB) to '%s' in %d file(s)", len(weight_map), total_bytes / 1e6, shown(out), n)
    return files


# ------------------------------------------------------------------------------------ single file

def save_state_dict_file(
    tensors: TensorStream,
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    layout: Layout | None = None,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Write every ``(name, tensor)`` pair into one ``.safetensors`` file, atomically.

    With ``layout`` (the stream's (name, shape, dtype) in order) the header is written first and
    every tensor goes to disk as it arrives (no buffering).

    The file is written inside a temporary sibling folder and moved into place with ``os.replace``
    (:func:`~lightning_merge.targets.atomic.atomic_output_file`: the checks, lock and clean-up of
    killed runs); if the stream raises, the temporary file is removed and ``path`` is untouched.
    ``inputs`` are paths the output must not be, contain or lie inside. Unlike
    :func:`save_safetensors_shards` this holds every tensor until the file is written (memory ~
    the model); use shards for large models.
    """
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ConfigError(f"'{out}': a state-dict file must end with .safetensors (the sources and "
                          "transformers pick the reader by suffix); rename the output path")
    meta = _check_metadata(metadata)
    expected = None if layout is None else sum(_nbytes_of(shape, dtype) for _, shape, dtype in layout)
    with atomic_output_file(out, overwrite=overwrite, inputs=inputs, expected_bytes=expected) as tmp:
        if layout is not None:
            entries = _plan_shards(layout, 1 << 62)
            if not entries:
                raise MergeError(f"the output layout for '{out}' is empty: nothing to save")
            stream = iter(tensors)
            _write_streamed_file(tmp, entries[0], stream, meta)
            extra = next(stream, None)
            if extra is not None:
                raise MergeError(f"the tensor stream gave '{extra[0]}', which the output layout does not list")
        else:
            collected: dict[str, Tensor] = {}
            names: set[str] = set()
            for name, raw in tensors:
                t = _prepare(name, raw, names)
                collected[name] = _unshare(collected, t)
            if not collected:
                raise MergeError(f"the tensor stream for '{out}' was empty: nothing to save; "
                                 "check that the merge plan selects at least one tensor")
            with writes(tmp):
                save_file(collected, str(tmp), metadata=meta)
            del collected
            _fsync_file(tmp)
    log.debug("wrote '%s'", out)
    return out
