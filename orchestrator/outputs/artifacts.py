"""Run directories written atomically: everything goes to a temp sibling, then one swap into place.

A crash never leaves a half-written run that looks complete, an existing run is never replaced
unless ``output.overwrite`` is set, and a replaced run is swapped out atomically
(:mod:`orchestrator.outputs.publish`). One run at a time writes to an output directory
(:func:`output_lock`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from orchestrator.errors import UsageError
from orchestrator.fileio import current_umask, finite_json, fsync_tree, sha256_file
from orchestrator.inputs.config import OutputConfig, RunConfig
from orchestrator.outputs.publish import (
    OutputLock,
    acquire_output_lock,
    check_writable,
    lock_path,
    output_lock,
    recover_if_idle,
    release_output_lock,
    resolve_output,
    swap_in,
)

__all__ = ["REPORT_SCHEMA_VERSION", "RunWriter", "check_output", "lock_path", "output_lock"]

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_output(out: OutputConfig) -> Path:
    """Validate the output directory before any work starts.

    A previous run that an interrupted replace left at ``.NAME.old-*`` (the final path missing) is
    restored first, unless another run holds the directory's lock.

    Returns:
        The resolved output directory.

    Raises:
        UsageError: the run exists and ``overwrite`` is off, or the parent is not writable.
    """
    final = resolve_output(out.dir)
    recover_if_idle(final)
    if final.exists() and not out.overwrite:
        raise UsageError(f"output.dir: {str(final)!r} already exists (set output.overwrite=true to replace it)")
    if final.exists() and not final.is_dir():
        raise UsageError(f"output.dir: {str(final)!r} exists and is not a directory")
    check_writable(final)
    return final


class RunWriter:
    """Collects a run's files in a temp directory and publishes them with one swap.

    Use as a context manager: on an exception the temp directory is removed and the previous run
    (if any) is left as it was. The writer holds the output directory's lock (:func:`output_lock`,
    re-entrant: the coordinator already holds it around the writer) until it is published or closed.

    Args:
        out: the output options.
        tag: names the temp directory exactly ``<parent>/.NAME.tmp-TAG`` (e.g. a job id, so a
            supervisor can delete what one job left); None picks a unique ``.NAME.tmp-XXXXXXXX``.

    Attributes:
        final: the resolved output directory.
        tmp: the temp directory the run is written into.
        created: parent directories created for this run (outermost first); removed again when the
            run fails and they are empty.

    Raises:
        UsageError: the output is taken or not writable, another run holds its lock, or the tagged
            temp directory exists already.
        ValueError: ``tag`` is not a plain name (letters, digits, ``._-``).
    """

    def __init__(self, out: OutputConfig, tag: str | None = None):
        if tag is not None and not _TAG.fullmatch(tag):
            raise ValueError(f"RunWriter tag {tag!r} is not a plain name (letters, digits, '._-')")
        check_output(out)  # the usual errors first, before any file is created
        self.final = resolve_output(out.dir)
        self.overwrite = out.overwrite
        self.known_hashes: dict[str, str] = {}  # relative path -> SHA-256 its writer computed (ranks' shards)
        self._lock: OutputLock | None = acquire_output_lock(self.final)
        self.created = list(self._lock.created)
        try:
            check_output(out)  # again, under the lock
            self.tmp = self._make_tmp(tag)
        except BaseException:
            self.close()
            raise

    def _make_tmp(self, tag: str | None) -> Path:
        """The temp directory: ``.NAME.tmp-TAG`` exactly (must not exist yet), else a unique mkdtemp name."""
        parent, name = self.final.parent, self.final.name
        tmp = parent / f".{name}.tmp-{tag}"
        try:
            if tag is None:
                return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
            tmp.mkdir(mode=0o700)
            return tmp
        except OSError as exc:
            if tag is not None and isinstance(exc, FileExistsError):
                raise UsageError(f"output.dir: temp directory {str(tmp)!r} already exists (left by an earlier "
                                 f"job tagged {tag!r}?)") from None
            raise UsageError(f"output.dir: cannot write into {str(parent)!r} ({exc.strerror or exc})") from None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the output lock (idempotent; :meth:`publish` and leaving the ``with`` block call it)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            release_output_lock(lock)

    def path(self, rel: str) -> Path:
        """Path of a file inside the run (in the temp directory until :meth:`publish`)."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, rel: str, obj) -> None:
        """Write ``obj`` as indented strict JSON: a non-finite number becomes ``null`` and its place is listed
        under a top-level ``non_finite`` key (a mapping's)."""
        obj, places = finite_json(json.loads(json.dumps(obj, default=_json_default)))
        if places and isinstance(obj, dict):
            obj["non_finite"] = places
        self.path(rel).write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")

    def write_config(self, cfg: RunConfig) -> None:
        """Write the resolved config as ``config.yaml``."""
        self.path("config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def write_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Write the mask set (bool, True = pruned) as ``masks.safetensors``."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous().to(torch.bool) for k, v in masks.items()}, str(self.path("masks.safetensors")))

    def write_model(self, model, tokenizer) -> None:
        """Save the model and tokenizer as a Hugging Face checkpoint under ``model/``."""
        target = self.path("model")
        model.save_pretrained(target, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(target)

    def publish(self) -> Path:
        """Write the manifest, sync every file and directory, and swap the run into place.

        Returns:
            The final path.

        Raises:
            UsageError: the output appeared meanwhile and ``overwrite`` is off.
        """
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(self.tmp))
                sha = self.known_hashes.get(rel) or sha256_file(p)  # the ranks hashed their files while writing
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha}
        (self.tmp / "manifest.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
        umask = current_umask()  # read, not set: os.umask would race with other threads
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; a published run is normal
        for p in self.tmp.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        fsync_tree(self.tmp)
        swap_in(self.tmp, self.final, self.overwrite)
        self.close()
        log.info("run written to %s", self.final)
        return self.final


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
