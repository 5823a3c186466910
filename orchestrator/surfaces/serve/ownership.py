"""Which paths a job owns: claimed before its task starts, released (deleted) exactly, never globbed.

A job's run is written by :class:`~orchestrator.outputs.artifacts.RunWriter` into
``.NAME.tmp-<job_id>`` next to ``output.dir`` and published by one rename; a distributed run keeps
checkpoints in ``.NAME.ckpt`` and holds ``.NAME.lock``. The registry claims a job's paths when it
accepts the job (refusing one whose directory equals, contains or lies inside another active job's),
creates the missing parents itself, and on failure or cancellation removes exactly what the job
owns: its temp directory, its checkpoints (unless the operator keeps them), its lock file, and the
parents it created once they are empty and no other active job lies below them. All of this runs
inside the registry actor, one call at a time, so no two jobs race on a ``mkdir``/``rmdir``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.outputs.publish import checkpoint_path, lock_path

log = logging.getLogger(__name__)


def temp_dir(final: Path, job_id: str) -> Path:
    """The temp directory a job's RunWriter writes (``RunWriter(out, tag=job_id)``)."""
    return final.parent / f".{final.name}.tmp-{job_id}"


@dataclass
class JobPaths:
    """The paths one job owns.

    Attributes:
        final: the run directory (``output.dir``), resolved.
        job_id: the job's id (names its temp directory).
        created: parent directories the registry created for it, outermost first.
        owns_checkpoint: whether no checkpoint existed when the job was accepted (so one there is its own).
        owns_lock: whether no lock file existed when the job was accepted.
    """

    final: Path
    job_id: str
    created: list[Path] = field(default_factory=list)
    owns_checkpoint: bool = True
    owns_lock: bool = True


def overlap(final: Path, others: Iterable[tuple[str, Path]]) -> str | None:
    """The first other job whose directory equals, contains or lies inside ``final``, as a message."""
    for job_id, other in others:
        if final == other:
            return f"output.dir: {str(final)!r} is the output of active job {job_id}"
        if final.is_relative_to(other):
            return f"output.dir: {str(final)!r} lies inside {str(other)!r}, the output of active job {job_id}"
        if other.is_relative_to(final):
            return f"output.dir: {str(final)!r} contains {str(other)!r}, the output of active job {job_id}"
    return None


def claim(final: Path, job_id: str, root: Path) -> JobPaths:
    """Record what a new job will own and create its missing parent directories (below ``root``).

    Raises:
        OSError: a parent cannot be created (nothing created is left behind).
    """
    missing = []
    parent = final.parent
    while parent != root and parent.is_relative_to(root) and not parent.exists():
        missing.append(parent)
        parent = parent.parent
    missing.reverse()
    paths = JobPaths(final, job_id, owns_checkpoint=not checkpoint_path(final).exists(),
                     owns_lock=not lock_path(final).exists())
    try:
        for d in missing:
            d.mkdir()
            paths.created.append(d)
    except OSError:
        release(paths, keep_checkpoint=True, busy=())
        raise
    return paths


def release(paths: JobPaths, keep_checkpoint: bool, busy: Iterable[Path]) -> list[str]:
    """Delete what a job that did not publish a run owns; returns the removed paths.

    Args:
        paths: the job's claim.
        keep_checkpoint: leave its checkpoint directory (the operator keeps failed checkpoints).
        busy: output directories of the other active jobs: a created parent above one of them stays.
    """
    removed = []
    tmp = temp_dir(paths.final, paths.job_id)
    targets = [tmp]
    if paths.owns_checkpoint and not keep_checkpoint:
        targets.append(checkpoint_path(paths.final))
    for target in targets:
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
            removed.append(str(target))
    lock = lock_path(paths.final)
    if paths.owns_lock and lock.is_file() and not (keep_checkpoint and checkpoint_path(paths.final).exists()):
        lock.unlink(missing_ok=True)
        removed.append(str(lock))
    busy = list(busy)
    for d in reversed(paths.created):
        if any(b.is_relative_to(d) for b in busy):
            break
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            break
        removed.append(str(d))
    return removed


def remove_run(run_dir: str | None, root: Path | None) -> list[str]:
    """Delete a finished job's published run directory (only one inside ``root``); returns what was removed."""
    if not run_dir or root is None:
        return []
    path = Path(run_dir)
    if path == root or not path.resolve().is_relative_to(root) or not path.is_dir():
        return []
    shutil.rmtree(path, ignore_errors=True)
    return [str(path)]


def job_bytes(paths: JobPaths) -> int:
    """Bytes a running job has written below the root: its temp directory and the checkpoints beside its output."""
    targets = [temp_dir(paths.final, paths.job_id), checkpoint_path(paths.final)]
    total = 0
    for target in targets:
        for here, _, files in os.walk(target):
            for name in files:
                try:
                    total += (Path(here) / name).lstat().st_size
                except OSError:  # removed while we walked (a rename into place, a cleaned version)
                    continue
    return total
