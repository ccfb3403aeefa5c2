"""Atomic outputs: a folder or file appears complete under its final name, or not at all.

Outputs are built in a temporary sibling (``<out>.tmp-<random>``, same filesystem) and renamed into
place only when complete. If the writer raises (a NaN found in an input, a bad hyperparameter,
Ctrl-C), the temporary output is removed and ``out`` is left as it was. The one non-atomic moment
is ``overwrite=True`` on an existing folder: the old folder is renamed aside (``<out>.old-<random>``),
the new one renamed in, and only then the old one deleted; a crash between those two renames leaves
the old folder at its ``.old-`` name (never lost).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import MergeError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class OutputExistsError(MergeError, FileExistsError):
    """The output path exists and ``overwrite`` was not set."""


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

