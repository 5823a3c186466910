"""Small file helpers shared by run directories, checkpoints and the run-key index (no torch, no Ray)."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _proc_umask() -> int | None:
    """The umask from the ``Umask:`` line of ``/proc/self/status`` (Linux 4.7+), or None."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _probe_umask() -> int:
    """Read the umask by setting and restoring it (process-global: only safe before threads start)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


#: The umask at import time, for platforms without ``/proc/self/status`` (read once, before any threads).
_IMPORT_UMASK = _proc_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _probe_umask()


def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only be read by setting it, which races with other threads creating files (a
    threaded Serve replica). On Linux the value comes from ``/proc/self/status``; elsewhere it is the
    umask probed once when this module was imported.

    Returns:
        The umask bits, e.g. ``0o022``.
    """
    umask = _proc_umask()
    return _IMPORT_UMASK if umask is None else umask


def fsync_path(path: str | Path) -> None:
    """Flush one file or directory (its entries, for a directory) to stable storage.

    Args:
        path: a regular file or a directory (symlinks are followed).

    Raises:
        OSError: the flush failed. A directory on a filesystem that cannot sync directories
            (``EINVAL``/``ENOTSUP``) is skipped.
    """
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not is_dir or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root``, then every directory, innermost first (``root`` last).

    Symlinks are not followed (their targets are not part of the tree).
    """
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):  # subdirectories come before dirpath
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temp file in the same directory and one rename.

    Readers see the old file or the new one, never a partial write; the file gets the
    process umask's permissions (not ``mkstemp``'s 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, and the dotted places replaced.

    Strict JSON (what browsers, ``jq`` and HTTP clients parse) has no NaN; a diverged perplexity must not
    make a report unreadable. Callers record the returned places next to the data (``non_finite``).

    Args:
        obj: JSON-like data (dicts, lists, scalars).
        where: the dotted place of ``obj`` (for the returned paths).

    Returns:
        The cleaned copy and the places of the replaced values.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [where or "."]
    if isinstance(obj, dict):
        out, found = {}, []
        for k, v in obj.items():
            out[k], sub = finite_json(v, f"{where}.{k}" if where else str(k))
            found += sub
        return out, found
    if isinstance(obj, (list, tuple)):
        items = [finite_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [p for _, sub in items for p in sub]
    return obj, []
