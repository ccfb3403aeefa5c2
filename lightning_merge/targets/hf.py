"""Write merged tensors to disk: atomic output folders, safetensors shards, Hugging Face folders.

Everything here consumes a *stream* of ``(name, tensor)`` pairs (what
:func:`lightning_merge.engine.run_plan` yields) and holds at most one shard of it in memory.

Nothing is half-written: outputs are built in a temporary sibling (``<out>.tmp-<random>``, same
filesystem) and renamed into place only when complete. If the stream raises (a NaN found in an
input, a bad hyperparameter, Ctrl-C), the temporary output is removed and ``out_dir`` is left as it
was. The one non-atomic moment is ``overwrite=True`` on an existing folder: the old folder is
renamed aside (``<out>.old-<random>``), the new one renamed in, and only then the old one deleted;
a crash between those two renames leaves the old folder at its ``.old-`` name (never lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError, MergeError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
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
CONFIG_FILE = "config.json"
#: copied from ``config_dir`` when present (config.json is copied separately, with its dtype updated)
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
_FINAL_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
#: output heads that ``tie_word_embeddings`` ties to an input embedding
_TIED_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_INPUT_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)\.weight$")


class OutputExistsError(MergeError, FileExistsError):
    """The output path exists and ``overwrite`` was not set."""


# ------------------------------------------------------------------------------------ atomic output

def _nonempty(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as it:
            return any(True for _ in it)
    return path.exists() or path.is_symlink()


def check_output_dir(out_dir: PathLike, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` when ``out_dir`` may not be written; writes nothing.

    An absent path or an empty directory is fine. A non-empty directory or a file is refused unless
    ``overwrite`` is true. Callers run this before starting a merge so that a long merge does not end
    in this error.
    """
    out = Path(out_dir)
    if overwrite or not _nonempty(out):
        return
    what = "a non-empty directory" if out.is_dir() else "a file"
    raise OutputExistsError(
        f"output '{out}' already exists and is {what}; choose another path, remove it, "
        "or pass overwrite=True to replace it"
    )


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.name}.{tag}-{secrets.token_hex(4)}")


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (moving an existing ``out`` aside when overwriting)."""
    if out.exists() or out.is_symlink():
        if not _nonempty(out):
            out.rmdir()  # an empty directory: nothing to keep
        elif not overwrite:
            raise OutputExistsError(
                f"output '{out}' appeared while the merge was being written; the result was discarded. "
                "Choose another path or pass overwrite=True"
            )
        else:
            old = _sibling(out, "old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _fsync_dir(out.parent)
            try:
                _remove(old)
            except OSError as err:
                log.warning("replaced '%s', but could not remove the previous version at '%s': %s; "
                            "delete it by hand", out, old, err)
            log.info("replaced existing output '%s'", out)
            return
    os.rename(tmp, out)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_output_dir(out_dir: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    On any exception (including ``KeyboardInterrupt``) the temporary directory is removed and
    ``out_dir`` is untouched. ``out_dir`` is checked with :func:`check_output_dir` on entry, before
    anything is written. Missing parent directories are created.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(out, "tmp")
        try:
            tmp.mkdir()  # honours the umask, unlike mkdtemp's 0o700
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a hidden sibling of ``path``, then rename it to ``path`` (created parents);
    on any exception the temporary file is removed and ``path`` is untouched."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ shards

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
    with open(path, "wb") as f:
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
            f.write(memoryview(data))
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
            os.replace(src, out / dst)
            created.append(out / dst)
        if n > 1:
            index = {
                "metadata": {"total_size": total_bytes, "total_parameters": total_params},
                "weight_map": {k: files[weight_map[k]] for k in sorted(weight_map)},
            }
            created.append(out / INDEX_FILE)
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            _fsync_file(out / INDEX_FILE)
    except BaseException:
        for p in provisional + created:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    _fsync_dir(out)
    log.info("wrote %d tensors (%.1f MB) to '%s' in %d file(s)", len(weight_map), total_bytes / 1e6, out, n)
    return files


# ------------------------------------------------------------------------------------ single file

def save_state_dict_file(
    tensors: TensorStream,
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    layout: Layout | None = None,
) -> Path:
    """Write every ``(name, tensor)`` pair into one ``.safetensors`` file, atomically.

    With ``layout`` (the stream's (name, shape, dtype) in order) the header is written first and
    every tensor goes to disk as it arrives (no buffering).

    The file is written under a temporary sibling name and moved into place with ``os.replace``;
    if the stream raises, the temporary file is removed and ``path`` is untouched. Unlike
    :func:`save_safetensors_shards` this holds every tensor until the file is written (memory ~
    the model); use shards for large models.
    """
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ConfigError(f"'{out}': a state-dict file must end with .safetensors (the sources and "
                          "transformers pick the reader by suffix); rename the output path")
    if out.is_dir():
        raise OutputExistsError(f"'{out}' is a directory; give a file path, "
                                "or use save_hf_folder to write a folder")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output '{out}' already exists; choose another path or pass overwrite=True")
    meta = _check_metadata(metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        if layout is not None:
            entries = _plan_shards(layout, 1 << 62)
            if not entries:
                raise MergeError(f"the output layout for '{out}' is empty: nothing to save")
            stream = iter(tensors)
            _write_streamed_file(tmp, entries[0], stream, meta)
            extra = next(stream, None)
            if extra is not None:
                raise MergeError(f"the tensor stream gave '{extra[0]}', which the output layout does not list")
            tensors = ()
        collected: dict[str, Tensor] = {}
        names: set[str] = set()
        for name, raw in tensors:
            t = _prepare(name, raw, names)
            collected[name] = _unshare(collected, t)
        if layout is None:
            if not collected:
                raise MergeError(f"the tensor stream for '{out}' was empty: nothing to save; "
                                 "check that the merge plan selects at least one tensor")
            save_file(collected, str(tmp), metadata=meta)
            del collected
            _fsync_file(tmp)
        if out.exists() and not overwrite:
            raise OutputExistsError(f"output '{out}' appeared while the merge was being written; "
                                    "the result was discarded. Choose another path or pass overwrite=True")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(out.parent)
    log.info("wrote '%s'", out)
    return out


# -------------------------------------------------------------------------------------- HF folders

def _fingerprint(t: Tensor) -> tuple[tuple[int, ...], torch.dtype, str]:
    """Shape, dtype and a hash of the bytes: equality of tensors without keeping them in memory."""
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return tuple(t.shape), t.dtype, hashlib.blake2b(flat.data, digest_size=16).hexdigest()


class _HfStream:
    """Wrap the stream for an HF folder: drop a tied output head equal to the input embedding,
    and count floating dtypes for the config's ``dtype`` field.

    With ``tie_word_embeddings`` true, ``save_pretrained`` writes only the input embedding. A head
    (``lm_head.weight`` / ``embed_out.weight``) whose bytes equal an input embedding seen in the stream
    (``embed_tokens``, ``wte``, ``word_embeddings``, ``embed_in``, ``tok_embeddings``, ``shared``) is
    dropped likewise. A head that differs (e.g. a random-drop merge drew other masks for the two
    names) is written, and the config is untied so that transformers loads it instead of silently
    re-tying it. A head that comes before any embedding is held back until the end of the stream.
    """

    def __init__(self, tensors: TensorStream, tied: bool):
        self.tensors = tensors
        self.tied = tied
        self.untie = False
        self.dtype_numel: Counter[torch.dtype] = Counter()
        self._embeds: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {}

    def _head_matches(self, name: str, t: Tensor) -> bool | None:
        """True/False: equals/differs from a seen embedding of its shape; None: none seen yet."""
        fp = _fingerprint(t)
        same_shape = [k for k, v in self._embeds.items() if v[:2] == fp[:2]]
        if not same_shape:
            return None
        if any(self._embeds[k] == fp for k in same_shape):
            log.debug("'%s' equals the tied input embedding %s: not written (as save_pretrained)", name,
                      same_shape)
            return True
        log.warning("the config ties '%s' to %s, but the merged values differ; writing both and setting "
                    "tie_word_embeddings=false in the written config", name, same_shape)
        self.untie = True
        return False

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        held: list[tuple[str, Tensor]] = []
        for name, t in self.tensors:
            if self.tied and isinstance(t, Tensor):
                t = t.detach().to("cpu").contiguous()
                if _INPUT_EMBED.search(name):
                    self._embeds[name] = _fingerprint(t)
                elif _TIED_HEAD.search(name):
                    match = self._head_matches(name, t)
                    if match is None:
                        held.append((name, t))
                        continue
                    if match:
                        continue
            yield self._count(name, t)
        for name, t in held:
            if self._head_matches(name, t) is not True:
                yield self._count(name, t)

    def _count(self, name: str, t: Tensor) -> tuple[str, Tensor]:
        if isinstance(t, Tensor) and t.dtype.is_floating_point:
            self.dtype_numel[t.dtype] += t.numel()
        return name, t


def _set_dtype(config: dict, dtype: torch.dtype) -> None:
    """Set ``dtype``/``torch_dtype`` wherever the config (or a nested sub-config) has one."""
    value = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config and config[key] is not None:
            config[key] = value
    for v in config.values():
        if isinstance(v, dict):
            _set_dtype(v, dtype)


def _read_config(config_dir: Path | None) -> dict | None:
    if config_dir is None:
        return None
    if not config_dir.is_dir():
        raise ConfigError(f"config_dir '{config_dir}' is not a directory; pass the folder holding the base "
                          "model's config.json and tokenizer files (or config_dir=None)")
    path = config_dir / CONFIG_FILE
    if not path.is_file():
        log.warning("config_dir '%s' has no config.json: the output will not load with from_pretrained "
                    "until one is added", config_dir)
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{path}' is not readable JSON ({err}); fix or replace that config.json") from err
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' holds a JSON {type(config).__name__}, not an object; "
                          "is it a model config?")
    return config


def save_hf_folder(
    tensors: TensorStream,
    out_dir: PathLike,
    *,
    config_dir: PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    layout: Layout | None = None,
    config_updates: dict | None = None,
) -> Path:
    """Write a Hugging Face model folder (shards + config + tokenizer) atomically; return its path.

    ``config_updates`` are set in the copied config.json (e.g. ``vocab_size`` after a merge that
    padded the embeddings to a larger vocabulary).

    ``layout`` (the stream's (name, shape, dtype) in order) lets the shards be written as the
    tensors arrive, with no buffering; it is ignored when the config ties an output head that the
    stream carries (that head may have to be dropped, see :class:`_HfStream`).

    Tensors are streamed into shards (:func:`save_safetensors_shards`) inside a temporary sibling
    folder that becomes ``out_dir`` only when everything is written (:func:`atomic_output_dir`).
    From ``config_dir`` (typically the base model's folder) ``config.json`` is copied with its
    ``dtype``/``torch_dtype`` field (where present) set to the dtype of the written floating tensors
    (the most common one by element count), and the generation config, tokenizer and chat-template
    files in :data:`COPIED_FILES` are copied where they exist (plus ``*.py`` when the config has an
    ``auto_map``, for ``trust_remote_code`` models). Tied embeddings are handled as described in
    :class:`_HfStream`.

    Raises :class:`OutputExistsError` before reading the stream if ``out_dir`` is a non-empty
    directory and ``overwrite`` is false.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    cfg_dir = None if config_dir is None else Path(config_dir)
    config = _read_config(cfg_dir)
    if config is not None and config_updates:
        config.update(config_updates)
    tied = bool(config and config.get("tie_word_embeddings", False))
    stream = _HfStream(tensors, tied=tied)
    if layout is not None and tied and any(_TIED_HEAD.search(name) for name, _, _ in layout):
        layout = None
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_safetensors_shards(stream, tmp, max_shard_bytes=max_shard_bytes, metadata=metadata, layout=layout)
        if config is not None:
            if stream.dtype_numel:
                ranked = stream.dtype_numel.most_common()
                if len(ranked) > 1:
                    log.info("the output mixes floating dtypes %s; config dtype set to the most common",
                             {str(k): v for k, v in ranked})
                _set_dtype(config, ranked[0][0])
            if stream.untie:
                config["tie_word_embeddings"] = False
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if cfg_dir is not None:
            copied = [n for n in COPIED_FILES if (cfg_dir / n).is_file()]
            if config is not None and config.get("auto_map"):
                copied += [p.name for p in sorted(cfg_dir.glob("*.py"))]
            for n in copied:
                shutil.copy2(cfg_dir / n, tmp / n)
            log.debug("copied %s from '%s'", copied, cfg_dir)
    log.info("saved Hugging Face folder '%s'", out)
    return out
