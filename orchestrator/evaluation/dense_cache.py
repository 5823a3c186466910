"""The dense model's evaluation, cached: a run whose dense baseline was measured before reuses it.

The key is a SHA-256 of everything that decides the dense numbers: the model's identity (a hub commit, or
a local checkpoint's files, as the run key identifies it), its dtype, the evaluation windows (their token
ids), the zero-shot tasks (their examples) and lm-eval tasks with their settings, and the versions of the
libraries that compute them. Entries live under ``$RAYPRUNE_CACHE/dense-eval/<key>.json``, written
atomically; ``eval.cache_dense: false`` neither reads nor writes them, nor does a process whose
``RAYPRUNE_DENSE_CACHE`` is ``0`` (the test suite's default, so no test reads another's numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: bump when what a dense evaluation returns changes shape
CACHE_VERSION = 1
DISABLE_ENV = "RAYPRUNE_DENSE_CACHE"  # 0: no dense-evaluation cache in this process


def dense_key(cfg: Any, windows: Any, tasks: dict[str, list], lm_eval_tasks: list[str]) -> str | None:
    """The cache key of the dense evaluation of ``cfg.model`` on ``windows`` and the tasks; None when the model
    cannot be identified for sure (a hub id whose commit the hub did not tell: no caching then).

    Args:
        cfg: the run config (``model``, ``eval``).
        windows: the ``(K, L)`` evaluation windows, or None (no perplexity).
        tasks: the builtin/JSONL zero-shot tasks, name -> examples.
        lm_eval_tasks: lm-eval task names.
    """
    from orchestrator.inputs.fingerprints import library_versions, model_identity, windows_fingerprint

    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return None
    identity = model_identity(cfg.model)
    if identity.get("kind") == "missing" or (identity.get("kind") == "hub" and not identity.get("commit")):
        return None
    doc = {"version": CACHE_VERSION, "model": identity, "model_options": dataclasses.asdict(cfg.model),
           "windows": None if windows is None else windows_fingerprint(windows),
           "tasks": {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()
                     for k, v in sorted(tasks.items())},
           "lm_eval": {"tasks": sorted(lm_eval_tasks), "limit": cfg.eval.task_limit},
           "libraries": library_versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _path(key: str) -> Path:
    from orchestrator.inputs.models import cache_dir

    return cache_dir() / "dense-eval" / f"{key}.json"


def load(key: str) -> dict | None:
    """The cached result of ``key`` (``{"ppl", "zeroshot"}``), or None."""
    path = _path(key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("key") != key:
        return None
    return entry["result"]


def store(key: str, result: dict) -> None:
    """Write ``result`` under ``key`` (atomically: a reader never sees half an entry; failures are logged)."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "result": result}, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs the next run a dense evaluation, nothing else
        log.warning("dense evaluation not cached (%s)", exc)
