"""Content-addressed runs for scheduled compression (``rayprune prune --if-changed``).

A *run key* is the SHA-256 of a canonical JSON document holding

* the resolved config's fields that decide the model or what is measured (the ``result`` and
  ``measure`` roles declared on each field in :mod:`orchestrator.inputs.config`; ``execution``
  fields such as ``output.dir``, ``backend.address``, ``backend.workers`` or ``eval.workers``
  only say where or how a run executes),
* the identity of the model revision (:func:`~orchestrator.inputs.fingerprints.model_identity`),
* the fingerprint of the calibration data, of the structured-recovery training data when it is
  its own source, and, when evaluation runs, of the evaluation data and of local zero-shot task
  files (:func:`~orchestrator.inputs.fingerprints.data_fingerprint`),
* the rayprune version and :data:`KEY_SCHEMA`.

A key never stays the same when the inputs changed in a way that matters, at the cost of an
occasional needless recompute: how files, hub revisions and builtin models are fingerprinted
is described in :mod:`orchestrator.inputs.fingerprints`. ``calibration.source: generate`` is
identified by the generation settings (and the model identity).

The key of a finished run is written into the run (``run_key`` file and ``report.json``)
and an index ``<output parent>/.rayprune-index/<key>`` points at the run directory; both
are written atomically. ``{key}`` in ``output.dir`` is replaced by the first
:data:`SHORT_KEY_LEN` hex digits of the key, e.g. ``output.dir=runs/nightly-{key}``.

This module imports neither Ray nor torch (torch only for builtin model names).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.errors import UsageError
from orchestrator.fileio import atomic_write_bytes
from orchestrator.inputs.config import MEASURE, RESULT, RunConfig
from orchestrator.inputs.fingerprints import (
    DATA_HASH_LIMIT,
    HubResolver,
    data_fingerprint,
    file_fingerprint,
    hub_commit,
    model_identity,
)

log = logging.getLogger(__name__)

KEY_SCHEMA = 1
SHORT_KEY_LEN = 12
KEY_PLACEHOLDER = "{key}"
INDEX_DIR = ".rayprune-index"
KEY_FILE = "run_key"
TASKS_DIR = Path(__file__).parents[1] / "evaluation" / "tasks"  # builtin zero-shot tasks: ``<name>.jsonl``


def key_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config's ``result`` and ``measure`` fields (the roles each field declares)."""
    return cfg.by_role(RESULT, MEASURE)


def key_document(cfg: RunConfig, resolve_hub: HubResolver = hub_commit) -> dict[str, Any]:
    """Everything the run key hashes, as a JSON-safe dict (useful to see why two keys differ)."""
    c = cfg.calibration
    if c.source == "generate":
        calibration = {"kind": "generate", "generate": dict(vars(c.generate)), "num_samples": c.num_samples,
                       "seq_len": c.seq_len, "seed": c.seed}
    else:
        calibration = data_fingerprint(c.source, c.hub_config, c.split, resolve_hub)
    recovery = None
    r = cfg.structured.recovery
    if cfg.structured.enabled and r.enabled and r.source not in (None, "calibration", "generate"):
        recovery = data_fingerprint(r.source, c.hub_config, c.split, resolve_hub)  # read like calibration.source
    evaluation = None
    if cfg.eval.enabled and cfg.eval.source:
        evaluation = data_fingerprint(cfg.eval.source, resolve_hub=resolve_hub)
    tasks = {}
    named = (getattr(cfg.eval, "tasks", None) or []) if cfg.eval.enabled else []
    for task in named:
        path = Path(task).expanduser()
        path = path if path.is_file() else TASKS_DIR / f"{task}.jsonl"
        tasks[task] = file_fingerprint(path, DATA_HASH_LIMIT) if path.is_file() else None  # None: a named task
    doc = {"schema": KEY_SCHEMA, "rayprune": __version__, "config": key_config(cfg),
           "model": model_identity(cfg.model, resolve_hub), "calibration": calibration, "eval": evaluation,
           "eval_tasks": tasks}
    if recovery is not None:  # only then: the keys of runs without their own recovery data stay as they were
        doc["recovery"] = recovery
    return doc


def run_key(cfg: RunConfig, resolve_hub: HubResolver = hub_commit) -> str:
    """SHA-256 (hex) of :func:`key_document`; cheap: reads no weights beyond small files."""
    blob = json.dumps(key_document(cfg, resolve_hub), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def expand_output_dir(template: str, key: str) -> str:
    """Replace every ``{key}`` in ``output.dir`` by the short key."""
    return template.replace(KEY_PLACEHOLDER, key[:SHORT_KEY_LEN])


def index_path(parent: Path, key: str) -> Path:
    """Index entry of ``key`` under an output parent directory."""
    return parent / INDEX_DIR / key


def is_finished(run_dir: Path, key: str) -> bool:
    """True when ``run_dir`` is a complete published run whose recorded key is ``key``.

    Checks the ``run_key`` file, ``report.json`` and that every file of ``manifest.json``
    exists with its recorded size (sizes only: no hashing on the fast path).
    """
    try:
        if (run_dir / KEY_FILE).read_text().strip() != key or not (run_dir / "report.json").is_file():
            return False
        files = json.loads((run_dir / "manifest.json").read_text())["files"]
        return all((run_dir / rel).is_file() and (run_dir / rel).stat().st_size == meta["bytes"]
                   for rel, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_finished(output_dir: str | Path, key: str) -> Path | None:
    """A finished run with ``key``: the index entry under the output parent, else the output dir itself."""
    final = Path(output_dir).expanduser().resolve()
    candidates = []
    entry = index_path(final.parent, key)
    try:
        candidates.append((final.parent / json.loads(entry.read_text())["run_dir"]).resolve())
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("run key: ignoring unreadable index entry %s", entry)
    candidates.append(final)
    for cand in candidates:
        if is_finished(cand, key):
            return cand
    return None


def record_run(run_dir: str | Path, key: str) -> Path:
    """Write (atomically: temp file + rename) the index entry pointing at a finished run."""
    run_dir = Path(run_dir).resolve()
    entry = index_path(run_dir.parent, key)
    doc = {"key": key, "run_dir": run_dir.name, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(entry, (json.dumps(doc) + "\n").encode())
    return entry


def prepare_run(cfg: RunConfig, reuse: bool, force: bool = False,
                resolve_hub: HubResolver = hub_commit) -> tuple[str, Path | None]:
    """Compute the run key, expand ``{key}`` in ``cfg.output.dir`` and look for a finished run.

    Args:
        cfg: the validated config; ``output.dir`` is expanded in place, and ``output.overwrite``
            is switched on when ``force`` recomputes a finished run with the same key in place.
        reuse: return a finished run with the same key instead of recomputing (``--if-changed``).
        force: recompute even when a finished run exists (``--force``).
        resolve_hub: hub revision resolver (tests).

    Returns:
        ``(key, existing run dir or None)``; None means: run into ``cfg.output.dir``.

    Raises:
        UsageError: with ``reuse``, ``output.dir`` holds a run with another key and
            ``output.overwrite`` is off.
    """
    key = run_key(cfg, resolve_hub)
    cfg.output.dir = expand_output_dir(cfg.output.dir, key)
    final = Path(cfg.output.dir).expanduser().resolve()
    if reuse and not force:
        found = find_finished(final, key)
        if found is not None:
            log.info("run key %s unchanged: reusing the finished run %s (--force recomputes)",
                     key[:SHORT_KEY_LEN], found)
            return key, found
    if force and is_finished(final, key):
        log.info("run key %s: --force recomputes the finished run %s in place", key[:SHORT_KEY_LEN], final)
        cfg.output.overwrite = True
    elif reuse and final.exists() and not cfg.output.overwrite:
        raise UsageError(
            f"output.dir: {str(final)!r} holds a run with another run key (inputs changed); set "
            f"output.overwrite=true or template the directory, e.g. output.dir=runs/nightly-{KEY_PLACEHOLDER}"
        )
    log.info("run key %s: computing into %s", key[:SHORT_KEY_LEN], final)
    return key, None
