"""Putting a finished run directory in place: a lock per output directory, a crash-safe swap, recovery.

- :func:`output_lock` takes an exclusive ``flock`` on ``<parent>/.NAME.lock`` for the whole run, so two
  runs with the same ``output.dir`` cannot share its temp, checkpoint (``.NAME.ckpt``) or old-run names.
  It is re-entrant within one thread (the coordinator holds it around a :class:`RunWriter` that takes it
  too); another thread or process is refused at once.
- :func:`swap_in` replaces a run atomically: on Linux with ``renameat2(RENAME_EXCHANGE)``, so the final
  path always holds a complete run; elsewhere (or where the filesystem refuses the exchange) with two
  renames through ``.NAME.old-<uuid4 hex>``.
- :func:`recover` undoes a crash between those two renames: the previous run is renamed back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator.fileio import fsync_path

log = logging.getLogger(__name__)

#: Test hook: ``between-renames`` ends the process (``os._exit(1)``) between the two renames of a replace.
FAULT_ENV = "RAYPRUNE_FAULT_PUBLISH"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: errno values meaning "this kernel or filesystem cannot do that rename": fall back to plain renames.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


def _libc_renameat2():
    """glibc's ``renameat2`` (2.28+) through ctypes, or None where it is missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the platform or filesystem does not support it.

    Raises:
        OSError: any other failure (``FileExistsError`` for ``RENAME_NOREPLACE`` onto an existing path).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (``RENAME_EXCHANGE``).

    Returns:
        True when swapped; False when unsupported here (nothing changed).
    """
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (``RENAME_NOREPLACE``).

    Returns:
        True when renamed; False when unsupported here (nothing changed).

    Raises:
        FileExistsError: ``dst`` exists.
    """
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        log.error("%s=%s: ending the process", FAULT_ENV, point)
        os._exit(1)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _appeared(final: Path) -> UsageError:
    return UsageError(f"output.dir: {str(final)!r} appeared while the run was working")


def swap_in(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move the finished (already synced) run ``tmp`` to ``final``, its sibling, and sync the parent.

    The caller holds :func:`output_lock` on ``final``. An existing run is replaced only when
    ``overwrite`` is set, by an atomic exchange where the filesystem supports one, otherwise by two
    renames through ``.NAME.old-<uuid4 hex>`` (restored if the second rename fails, and by
    :func:`recover` after a crash between them).

    Raises:
        UsageError: ``final`` exists and ``overwrite`` is off.
        OSError: a rename failed (the previous run, if any, is back at ``final``).
    """
    parent = final.parent
    if not _exists(final):
        try:
            if not rename_noreplace(tmp, final):
                if _exists(final):
                    raise _appeared(final)
                os.rename(tmp, final)
        except FileExistsError:
            raise _appeared(final) from None
        fsync_path(parent)
        return
    if not overwrite:
        raise _appeared(final)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
    if exchange(tmp, final):  # no moment without a complete run at final
        fsync_path(parent)
        try:  # tmp's name now holds the previous run: as .old-*, a crash while deleting it is cleaned up later
            os.rename(tmp, old)
        except OSError:
            old = tmp
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(final, old)
    _fault("between-renames")
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    fsync_path(parent)  # the new run's name is durable before the old run's data goes
    shutil.rmtree(old, ignore_errors=True)


def _old_runs(final: Path) -> list[Path]:
    """Previous runs a replace moved aside (``.NAME.old-<uuid4 hex>``, or a legacy ``-<pid>``), oldest first."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.old-(?:[0-9a-f]{{32}}|\d+)")
    found = [p for p in final.parent.glob(glob.escape(f".{final.name}.old-") + "*")
             if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover(final: Path) -> Path | None:
    """Finish what a crash during a replace left; the caller holds :func:`output_lock` on ``final``.

    If ``final`` is missing but a previous run sits at ``.NAME.old-*``, it is renamed back (a warning
    is logged). Once ``final`` exists, any ``.NAME.old-*`` left next to it is a replaced run and is removed.

    Returns:
        The restored previous run's old path, or None when nothing was restored.
    """
    if not final.parent.is_dir():
        return None
    olds = _old_runs(final)
    restored = None
    if olds and not _exists(final):
        restored = olds.pop()
        os.rename(restored, final)
        fsync_path(final.parent)
        log.warning("output.dir: %s was missing after an interrupted replace; restored the previous run from %s",
                    final, restored.name)
    for old in olds:
        log.info("output.dir: removing %s, a run replaced by %s", old, final)
        shutil.rmtree(old, ignore_errors=True)
    return restored


def recover_if_idle(final: Path) -> None:
    """:func:`recover` under the output lock, when a ``.NAME.old-*`` is left and no other run holds the lock."""
    if not final.parent.is_dir() or not _old_runs(final):
        return
    try:
        with output_lock(final):
            recover(final)
    except UsageError as exc:  # in use (that run recovers it) or not writable
        log.debug("not recovering %s: %s", final, exc)


# ---------------------------------------------------------------------------------------------- lock


@dataclass(eq=False)
class OutputLock:
    """A held lock on one output directory (see :func:`output_lock`).

    Attributes:
        final: the resolved output directory.
        path: the lock file, ``<parent>/.NAME.lock``.
        created: parent directories created to hold the lock file, outermost first; removed again
            (when empty) on the last release.
    """

    final: Path
    path: Path
    created: list[Path] = field(default_factory=list)
    fd: int = -1
    owner: int = 0
    depth: int = 1


_HELD: dict[Path, OutputLock] = {}
_HELD_GUARD = threading.Lock()


def resolve_output(path: str | Path) -> Path:
    """The absolute output directory that locks and checks refer to."""
    return Path(path).expanduser().resolve()


def checkpoint_path(output_dir: str | Path) -> Path:
    """Where a distributed run keeps its phase checkpoints: ``.NAME.ckpt`` next to the output directory."""
    final = Path(output_dir).expanduser().resolve()
    return final.parent / f".{final.name}.ckpt"


def lock_path(final: str | Path) -> Path:
    """The lock file of an output directory: ``<parent>/.NAME.lock``."""
    final = resolve_output(final)
    return final.parent / f".{final.name}.lock"


def missing_dirs(path: Path) -> list[Path]:
    """Ancestors of ``path`` (itself included) that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def remove_empty(dirs: list[Path]) -> None:
    """Remove directories that are empty, innermost first, stopping at the first that is not."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            break


def check_writable(final: Path) -> None:
    """Refuse an output directory whose nearest existing ancestor cannot be written.

    Raises:
        UsageError: ``output.dir: '<parent>' is not writable``.
    """
    probe = final.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output.dir: {str(final.parent)!r} is not writable")


def _in_use(final: Path, lock: Path) -> UsageError:
    return UsageError(f"output.dir: {str(final)!r} is in use by another run (lock {lock})")


def _cannot_write(final: Path, exc: OSError) -> UsageError:
    return UsageError(f"output.dir: cannot write into {str(final.parent)!r} ({exc.strerror or exc})")


def _take(final: Path, lock: Path) -> OutputLock:
    """Create the parents and the lock file and ``flock`` it (exclusive, non-blocking)."""
    check_writable(final)
    created = missing_dirs(final.parent)
    for _attempt in range(5):  # a releasing holder may remove an empty parent between mkdir and open
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            continue
        except OSError as exc:
            remove_empty(created)
            raise _cannot_write(final, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(final, lock) from None
        except OSError as exc:  # a filesystem without locks: the run goes on, unprotected
            log.warning("output.dir: cannot lock %s (%s); runs on %s are not kept apart", lock,
                        exc.strerror or exc, final)
        try:  # the file may have been unlinked by its last holder between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return OutputLock(final, lock, created, fd, threading.get_ident())
        os.close(fd)
    remove_empty(created)
    raise UsageError(f"output.dir: could not take the lock {lock} (it kept changing)")


def acquire_output_lock(final: str | Path) -> OutputLock:
    """Take the lock of an output directory (see :func:`output_lock`); pair with :func:`release_output_lock`.

    Raises:
        UsageError: another run (another process, or another thread of this one) holds it, or the
            parent cannot be created or written.
    """
    final = resolve_output(final)
    lock = lock_path(final)
    with _HELD_GUARD:
        held = _HELD.get(lock)
        if held is not None:
            if held.owner != threading.get_ident():
                raise _in_use(final, lock)
            held.depth += 1
            return held
        held = _take(final, lock)
        _HELD[lock] = held
        return held


def release_output_lock(held: OutputLock) -> None:
    """Release one hold; the last one unlinks the lock file, unlocks, and removes the empty parents it created."""
    with _HELD_GUARD:
        held.depth -= 1
        if held.depth > 0 or _HELD.get(held.path) is not held:
            return
        del _HELD[held.path]
        try:
            held.path.unlink()  # while still locked: a waiter that opened it sees a stale inode and retries
        except FileNotFoundError:
            pass
        os.close(held.fd)
        remove_empty(held.created)


@contextmanager
def output_lock(final: str | Path) -> Iterator[OutputLock]:
    """Hold the exclusive lock of an output directory for the enclosed block.

    The lock is a ``flock`` on ``<parent>/.NAME.lock`` (parents are created, and removed again when
    still empty at the end). It is re-entrant in the thread that holds it; any other thread or
    process is refused at once.

    Args:
        final: the output directory (``output.dir``).

    Yields:
        The held lock.

    Raises:
        UsageError: ``output.dir: '<path>' is in use by another run (lock <lockpath>)``, or the parent
            is not writable.
    """
    held = acquire_output_lock(final)
    try:
        yield held
    finally:
        release_output_lock(held)
