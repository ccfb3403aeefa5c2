"""Atomic outputs: a folder or file appears complete under its final name, or not at all.

How an output ``OUT`` is written (:func:`atomic_output_dir`, :func:`atomic_output_file`):

1. Checks, before anything is written: ``OUT`` is not, does not contain and does not lie inside any
   input (real paths, symlinks followed; :func:`check_not_an_input`); the nearest existing folder
   above it is a writable directory on a writable filesystem; there is room for the expected size
   (:func:`check_free_space`); ``OUT`` is absent or empty unless ``overwrite``.
2. A lock file ``.OUT.lightning-merge.lock`` beside ``OUT`` is taken with ``flock``: a second run
   writing the same ``OUT`` stops at once with :class:`~lightning_merge.errors.OutputError` naming
   the run that holds it. The lock dies with its process, so a killed run never blocks the next.
3. Leftovers of killed runs for the same ``OUT`` are found: the lock file records the temporary
   name each run uses, and every temporary folder holds a marker file (:data:`MARKER`). Ours are
   removed with one warning; a ``OUT.tmp-*`` sibling that is not recognisably ours stops the run.
   A previous version of ``OUT`` left at ``OUT.old-*`` by a run killed while replacing it is put
   back when ``OUT`` is missing, and removed when the replacement is complete.
4. The output is built in the temporary sibling ``OUT.tmp-<random>`` (same filesystem) and renamed
   into place only when complete; any exception (a NaN in an input, a full disk, Ctrl-C, SIGTERM,
   SIGHUP) removes it. ``overwrite=True`` renames the old ``OUT`` aside, renames the new one in,
   then deletes the old one.
5. ``OSError`` while writing (ENOSPC, EIO, EACCES, EROFS) becomes one
   :class:`~lightning_merge.errors.OutputError` naming the user's path, never the temporary one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Interrupted, OutputError

try:  # POSIX; elsewhere concurrent runs are caught only at the final rename
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
#: the file inside every temporary output folder that marks it as this tool's own
MARKER = ".lightning-merge-partial"
LOCK_SUFFIX = ".lightning-merge.lock"
_TMP = re.compile(r"\.tmp-[0-9a-f]{8}$")
_OLD = re.compile(r"\.old-[0-9a-f]{8}$")


class OutputExistsError(OutputError, FileExistsError):
    """The output path exists and ``overwrite`` was not set."""


# --------------------------------------------------------------------------------------- checks

def _nonempty(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as it:
            return any(True for _ in it)
    return path.exists() or path.is_symlink()


def check_output_dir(out_dir: PathLike, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` when ``out_dir`` may not be written; writes nothing.

    An absent path or an empty directory is fine. A non-empty directory or a file is refused unless
    ``overwrite`` is true.
    """
    out = Path(out_dir)
    if overwrite or not _nonempty(out):
        return
    what = "a non-empty directory" if out.is_dir() else "a file"
    raise OutputExistsError(
        f"output '{out}' already exists and is {what}; choose another path, remove it, "
        "or pass overwrite=True to replace it"
    )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def check_not_an_input(out: PathLike, inputs: Iterable[PathLike]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``overwrite`` or not).

    Paths are compared after resolving symlinks (``os.path.realpath``) and, where both exist, by
    device and inode too (bind mounts, hard-linked files)."""
    o = _real(Path(out))
    for raw in inputs:
        i = _real(Path(raw))
        same = o == i or (o.exists() and i.exists() and os.path.samefile(o, i))
        if same or i.is_relative_to(o) or o.is_relative_to(i):
            how = "is" if same else ("contains" if i.is_relative_to(o) else "lies inside")
            raise OutputError(
                f"output '{out}' {how} the input '{raw}'; writing there would destroy the input "
                "(refused even with overwrite=True); choose an output path outside every input"
            )


def _existing_ancestor(path: Path) -> Path:
    p = path.expanduser().absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_location(out: PathLike) -> None:
    """The nearest existing folder above ``out`` must be a directory we may write, on a writable
    filesystem (checked with ``statvfs``, so it holds for root too)."""
    where = _existing_ancestor(Path(out))
    if not where.is_dir():
        raise OutputError(f"output '{out}': '{where}' is a file, so no folder can be created under it; "
                          "choose another output path")
    readonly = False
    with contextlib.suppress(OSError, AttributeError):
        readonly = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    if readonly or not os.access(where, os.W_OK | os.X_OK):
        why = "is on a read-only filesystem" if readonly else "is not writable by this user"
        raise OutputError(f"output '{out}': '{where}' {why}; choose a writable location")


def check_free_space(out: PathLike, nbytes: int) -> None:
    """Refuse when the filesystem that will hold ``out`` has less than ``nbytes`` (+1%, +1 MiB) free."""
    where = _existing_ancestor(Path(out))
    free = shutil.disk_usage(where).free
    need = int(nbytes * 1.01) + (1 << 20)
    if free < need:
        raise OutputError(
            f"output '{out}': the merge writes about {_human(nbytes)}, but the filesystem holding '{where}' "
            f"has {_human(free)} free; free some space or choose another location"
        )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


# ------------------------------------------------------------------------------- write failures

#: (temporary folder, final path) of the output being written by this context, for messages
_WRITING: ContextVar[tuple[Path, Path, bool] | None] = ContextVar("lightning_merge_writing", default=None)
_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another location",
    errno.EROFS: "the filesystem is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a writable location",
    errno.EPERM: "permission denied: choose a writable location",
    errno.EIO: "an I/O error on the device: check the disk, then run again",
}


def shown(path: PathLike) -> Path:
    """``path`` as the user knows it: a path inside the temporary folder maps to the final output."""
    p = Path(path)
    cur = _WRITING.get()
    if cur is not None:
        tmp, out, single_file = cur
        if p == tmp or (single_file and p.is_relative_to(tmp)):
            return out
        if p.is_relative_to(tmp):
            return out / p.relative_to(tmp)
    return p


@contextlib.contextmanager
def writes(path: PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into one :class:`OutputError` naming the
    user's output (not the temporary path)."""
    try:
        yield
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise write_error(shown(path), err) from err


def write_error(path: Path, err: OSError) -> OutputError:
    hint = _HINTS.get(err.errno or 0, "check the output location")
    reason = err.strerror or str(err)
    return OutputError(f"could not write '{path}': {reason}; {hint}. Nothing was written")


# --------------------------------------------------------------------------------------- signals

@contextlib.contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """Within this block, SIGTERM and SIGHUP raise :class:`~lightning_merge.errors.Interrupted` in
    the main thread (as SIGINT raises ``KeyboardInterrupt``), so cleanup code runs.

    Only signals still at their default disposition are taken over (an application's own handler,
    e.g. Lightning's SLURM requeue, is left alone), only in the main thread, and the previous
    handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    saved = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, raise_interrupted)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------ lock

@dataclass
class _Lock:
    """The held lock on one output path; :attr:`previous` is what the last holder recorded."""

    path: Path
    fd: int | None
    previous: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def record(self, **entries: str | None) -> None:
        """Write which temporary / old names this run uses, so a later run can recognise them."""
        self.state.update(entries)
        if self.fd is None:
            return
        data = json.dumps(self.state).encode()
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)


def _read_lock(fd: int) -> dict:
    with contextlib.suppress(OSError, ValueError):
        raw = os.pread(fd, 1 << 16, 0)
        value = json.loads(raw.decode()) if raw else {}
        return value if isinstance(value, dict) else {}
    return {}


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[_Lock]:
    """Hold ``.OUT.lightning-merge.lock`` (``flock``, non-blocking) for the duration of the block."""
    path = out.with_name(f".{out.name}{LOCK_SUFFIX}")
    if fcntl is None:  # pragma: no cover
        yield _Lock(path, None)
        return
    while True:
        with writes(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = _read_lock(fd)
            os.close(fd)
            who = (f" (pid {other.get('pid')} on {other.get('host')}, started {other.get('started')})"
                   if other.get("pid") else "")
            raise OutputError(f"another lightning-merge run{who} is writing '{out}' right now; wait for it "
                              "to finish or choose another output path") from None
        try:  # the previous holder may have unlinked the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    lock = _Lock(path, fd, previous=_read_lock(fd))
    lock.record(pid=str(os.getpid()), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                out=out.name)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ------------------------------------------------------------------------------------- leftovers

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def recover_leftovers(out: Path, previous: dict) -> None:
    """Clean up after earlier runs on ``out`` that were killed (called with the lock held)."""
    if not out.parent.is_dir():
        return
    ours_tmp = {previous.get("tmp")} - {None}
    ours_old = {previous.get("old")} - {None}
    prefix = out.name
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(prefix) or p.name == prefix:
            continue
        rest = p.name[len(prefix):]
        if _TMP.fullmatch(rest):
            if p.name in ours_tmp or (p.is_dir() and (p / MARKER).is_file()):
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0
                _remove(p)
                log.warning("removed '%s' (%s), the partial output of an earlier run on '%s' that was "
                            "killed", p, _human(size), out)
            else:
                raise OutputError(
                    f"'{p}' looks like a temporary output for '{out}' but is not recognisably "
                    "lightning-merge's (no marker file); move or delete it, then run again"
                )
        elif _OLD.fullmatch(rest) and p.name in ours_old:
            if not out.exists() and not out.is_symlink():
                os.rename(p, out)
                log.warning("restored '%s' from '%s': an earlier run was killed while replacing it", out, p)
            else:
                _remove(p)
                log.warning("removed '%s', the previous version of '%s' that an earlier run replaced "
                            "before it was killed", p, out)


# --------------------------------------------------------------------------------------- writing

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
    with writes(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_parents(out: Path) -> list[Path]:
    created: list[Path] = []
    p = out.expanduser().absolute().parent
    missing = []
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with writes(d):
            d.mkdir()
        created.append(d)
    return created


def _commit(tmp: Path, out: Path, overwrite: bool, lock: _Lock) -> None:
    """Rename the finished ``tmp`` to ``out`` (moving an existing ``out`` aside when overwriting)."""
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not _nonempty(out):
            out.rmdir()  # an empty directory: nothing to keep
        elif not overwrite:
            raise OutputExistsError(
                f"output '{out}' appeared while the merge was being written; the result was discarded. "
                "Choose another path or pass overwrite=True"
            )
        else:
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            lock.record(old=old.name)
            with writes(out):
                os.rename(out, old)
            try:
                with writes(out):
                    os.replace(tmp, out)
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
    with writes(out):
        os.replace(tmp, out)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def _atomic(out_path: PathLike, overwrite: bool, inputs: Iterable[PathLike], expected_bytes: int | None,
            file_name: str | None) -> Iterator[Path]:
    out = Path(out_path)
    inputs = list(inputs)
    check_not_an_input(out, inputs)
    if file_name is not None and out.is_dir() and not out.is_symlink():
        raise OutputExistsError(f"'{out}' is a directory; give a file path, or write a folder instead")
    check_writable_location(out)
    if expected_bytes is not None:
        check_free_space(out, expected_bytes)
    check_output_dir(out, overwrite)
    with interrupt_on_termination():
        created = _make_parents(out)
        try:
            with output_lock(out) as lock:
                recover_leftovers(out, lock.previous)
                check_output_dir(out, overwrite)
                tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
                lock.record(tmp=tmp.name)
                token = _WRITING.set((tmp, out, file_name is not None))
                try:
                    with writes(tmp):
                        tmp.mkdir()  # honours the umask, unlike mkdtemp's 0o700
                        (tmp / MARKER).write_text(json.dumps(lock.state) + "\n")
                    yield tmp if file_name is None else tmp / file_name
                    (tmp / MARKER).unlink()
                    if file_name is None:
                        _commit(tmp, out, overwrite, lock)
                    else:  # one file: os.replace is atomic even over an existing file
                        if _nonempty(out) and not overwrite:
                            raise OutputExistsError(
                                f"output '{out}' appeared while the merge was being written; the result "
                                "was discarded. Choose another path or pass overwrite=True")
                        with writes(out):
                            os.replace(tmp / file_name, out)
                        tmp.rmdir()
                        _fsync_dir(out.parent)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                finally:
                    _WRITING.reset(token)
        except BaseException:
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise


def atomic_output_dir(out_dir: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = (),
                      expected_bytes: int | None = None) -> contextlib.AbstractContextManager[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    See the module docstring for the checks, the lock and the clean-up; ``inputs`` are the paths the
    output must not touch, ``expected_bytes`` the size checked against the free space. Missing
    parent directories are created (and removed again if the write fails)."""
    return _atomic(out_dir, overwrite, inputs, expected_bytes, None)


def atomic_output_file(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = (),
                       expected_bytes: int | None = None) -> contextlib.AbstractContextManager[Path]:
    """Like :func:`atomic_output_dir` for one file: yields a path inside a temporary folder, which
    is moved to ``path`` (``os.replace``) when the block succeeds."""
    return _atomic(path, overwrite, inputs, expected_bytes, Path(path).name)


def atomic_file(path: PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a hidden sibling of ``path``, then rename it to ``path`` (created parents);
    on any exception the temporary file is removed and ``path`` is untouched. For the package's own
    small files (data splits, coefficients, plots); merged models use :func:`atomic_output_dir`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
