"""Content identity of model files: what a configuration hash records instead of a path.

A resumed fit must know whether the experts behind its paths are still the files it merged. A
path says nothing once a file is replaced (a re-trained expert saved to the same folder), and a
modification time differs between two nodes that hold identical copies. :func:`content_identity`
hashes, for every model file under a path (weights, indexes, configs, adapters), its relative
name, its size, its first 64 KiB (a safetensors header and its metadata, a config's text) and 16
blocks of 4 KiB at fixed fractions of its length. Re-trained weights change nearly every byte, so
they change the identity; an identical copy anywhere, with any mtime, has the same one. Reading
costs about 130 KiB per file, whatever its size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["content_identity", "identified"]

#: the files of a model folder that determine its weights
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".model")
HEAD_BYTES = 1 << 16
SAMPLES = 16
SAMPLE_BYTES = 1 << 12
_cache: dict[tuple[str, int, int, int], str] = {}


def _file_digest(path: Path, h: hashlib.blake2b) -> None:
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            for k in range(SAMPLES):
                f.seek(HEAD_BYTES + (size - HEAD_BYTES) * k // SAMPLES)
                h.update(f.read(SAMPLE_BYTES))
            f.seek(max(size - SAMPLE_BYTES, 0))
            h.update(f.read(SAMPLE_BYTES))


def content_identity(path: str | os.PathLike) -> str:
    """A 16-hex-digit fingerprint of the model file or folder at ``path`` (see the module doc).

    A path that does not exist gets ``"missing"``; results are cached per (real path, size,
    mtime, inode) within the process."""
    p = Path(path).expanduser()
    if not p.exists():
        return "missing"
    st = p.stat()
    key = (os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _cache and not p.is_dir():
        return _cache[key]
    h = hashlib.blake2b(digest_size=8)
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.name.endswith(MODEL_SUFFIXES) and not f.name.startswith(".")
    )
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        _file_digest(f, h)
    digest = h.hexdigest()
    _cache[key] = digest
    return digest


def identified(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its ``experts`` and ``base`` paths replaced by their files' content identity,
    so that a configuration hash changes when the files behind a path are replaced, and not when
    identical files move."""
    out = dict(config)
    if out.get("experts") is not None:
        out["experts"] = [content_identity(e) if isinstance(e, (str, os.PathLike)) else repr(e)
                          for e in out["experts"]]
    if isinstance(out.get("base"), (str, os.PathLike)):
        out["base"] = content_identity(out["base"])
    return out
