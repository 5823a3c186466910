"""Run directories written atomically: everything goes to a temp sibling, then one rename.

A crash never leaves a half-written run that looks complete, and an existing run is
never replaced unless ``output.overwrite`` is set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from orchestrator.errors import UsageError
from orchestrator.fileio import sha256_file
from orchestrator.inputs.config import OutputConfig, RunConfig

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1


def check_output(out: OutputConfig) -> Path:
    """Validate the output directory before any work starts.

    Raises:
        UsageError: the run exists and ``overwrite`` is off, or the parent is not writable.
    """
    final = Path(out.dir).expanduser().resolve()
    if final.exists() and not out.overwrite:
        raise UsageError(f"output.dir: {str(final)!r} already exists (set output.overwrite=true to replace it)")
    if final.exists() and not final.is_dir():
        raise UsageError(f"output.dir: {str(final)!r} exists and is not a directory")
    parent = final.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output.dir: {str(parent)!r} is not writable")
    return final


class RunWriter:
    """Collects a run's files in a temp directory and publishes them with one rename.

    Use as a context manager: on an exception the temp directory is removed and the
    previous run (if any) is left as it was.
    """

    def __init__(self, out: OutputConfig):
        self.final = check_output(out)
        self.overwrite = out.overwrite
        self.created = _missing_dirs(self.final.parent)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        except OSError as exc:
            self._remove_created()
            raise UsageError(
                f"output.dir: cannot write into {str(self.final.parent)!r} ({exc.strerror or exc})"
            ) from None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_created()

    def _remove_created(self) -> None:
        """Remove the (still empty) parent directories this writer created, innermost first."""
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break

    def path(self, rel: str) -> Path:
        """Path of a file inside the run (in the temp directory until :meth:`publish`)."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, rel: str, obj) -> None:
        """Write ``obj`` as indented JSON."""
        self.path(rel).write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")

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
        """Write the manifest and move the run into place; returns the final path."""
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(self.tmp))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        (self.tmp / "manifest.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; a published run is normal
        for p in self.tmp.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        old = None
        if self.final.exists():
            if not self.overwrite:
                raise UsageError(f"output.dir: {str(self.final)!r} appeared while the run was working")
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            self.final.rename(old)
        self.tmp.rename(self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("run written to %s", self.final)
        return self.final


def _missing_dirs(path: Path) -> list[Path]:
    """Ancestors of ``path`` (itself included) that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
