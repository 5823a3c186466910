"""Fingerprints of a run's inputs: the model revision, data sources, calibration windows, libraries.

Two users compare them:

* run keys of scheduled runs (:mod:`orchestrator.surfaces.runkeys`, ``rayprune prune --if-changed``)
  hash :func:`model_identity` and :func:`data_fingerprint` (calibration, recovery and evaluation
  data) with :func:`file_fingerprint` of local zero-shot task files, to recompute only when an
  input changed;
* a distributed run's checkpoints (:mod:`actors.checkpoint`) record :func:`checkpoint_inputs`
  (the calibration windows actually used, :func:`windows_fingerprint`; the model identity; the
  versions of :data:`CHECKPOINT_LIBRARIES`, :func:`library_versions`), and ``--resume`` refuses
  with :func:`inputs_refusal` when :func:`inputs_mismatch` finds that they differ.

Choices, made so that a fingerprint never stays the same when the inputs changed in a way that
matters, at the cost of an occasional needless recompute:

* Files up to a size limit are hashed by content (SHA-256); bigger ones are identified
  by resolved path, size and ``mtime_ns`` (:data:`DATA_HASH_LIMIT` for data,
  :data:`MODEL_HASH_LIMIT` for files of a model directory, so ``config.json``, tokenizer
  files and index files are always read and multi-GB weight shards are only stat'ed).
  Rewriting a big file in place with the same size and mtime goes unnoticed; copying a
  model elsewhere or touching it changes the fingerprint.
* Hub models are identified by ``model.revision`` resolved to a commit through
  ``huggingface_hub`` when the hub is reachable (a 40-hex revision is taken as is);
  offline the literal revision (``main`` when unset) is used.
* Builtin models by their pip package and member (pin the package in
  :data:`orchestrator.inputs.models.BUILTIN` to make its version part of the fingerprint);
  ``tiny`` models by their shape/seed and the torch/transformers versions that initialise them.

This module imports neither Ray nor torch (torch only for builtin model names; numpy only to
hash windows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.fileio import sha256_file
from orchestrator.inputs.config import ModelConfig

log = logging.getLogger(__name__)

DATA_HASH_LIMIT = 256 * 2**20
MODEL_HASH_LIMIT = 8 * 2**20
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")  # orchestrator.inputs.data.LOCAL_SUFFIXES (kept torch-free)
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

HubResolver = Callable[[str, str | None, str], str | None]


def hub_commit(repo_id: str, revision: str | None, kind: str = "model") -> str | None:
    """Resolve a hub revision to its commit hash, or None when the hub cannot be asked.

    Args:
        repo_id: ``owner/name`` on the hub.
        revision: branch, tag or commit (None: ``main``).
        kind: ``model`` or ``dataset``.
    """
    if revision and _SHA_RE.match(revision):
        return revision
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = (api.model_info if kind == "model" else api.dataset_info)(repo_id, revision=revision, timeout=15)
        return info.sha
    except Exception as exc:  # noqa: BLE001 - offline or unknown repo: fall back to the literal revision
        log.warning("run key: cannot resolve %s %s@%s on the hub (%s); using the literal revision",
                    kind, repo_id, revision or "main", type(exc).__name__)
        return None


def file_fingerprint(path: Path, limit: int) -> dict[str, Any]:
    """Content hash of a file up to ``limit`` bytes, else its resolved path, size and mtime."""
    st = path.stat()
    if st.st_size <= limit:
        return {"bytes": st.st_size, "sha256": sha256_file(path)}
    return {"bytes": st.st_size, "path": str(path.resolve()), "mtime_ns": st.st_mtime_ns}


def _dir_files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Regular files below ``root`` (hidden ones skipped), sorted by relative path."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if suffixes is None or p.suffix in suffixes:
            out.append(p)
    return out


def _versions(*packages: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def model_identity(cfg: ModelConfig, resolve_hub: HubResolver = hub_commit) -> dict[str, Any]:
    """What identifies the model revision a run prunes (see the module docstring).

    Args:
        cfg: the ``model`` section.
        resolve_hub: ``(repo_id, revision, kind) -> commit or None``; injectable for tests.
    """
    src = cfg.source
    path = Path(src).expanduser()
    if src == "tiny":
        return {"kind": "tiny", **_versions("torch", "transformers", "tokenizers")}
    if "/" not in src and not src.endswith(".gguf"):
        from orchestrator.inputs.models import BUILTIN  # torch: only for builtin-looking names

        if src in BUILTIN:
            return {"kind": "builtin", "name": src, **BUILTIN[src]}
    if path.is_file():
        return {"kind": "file", **file_fingerprint(path, MODEL_HASH_LIMIT)}
    if path.is_dir():
        files = {str(p.relative_to(path)): file_fingerprint(p, MODEL_HASH_LIMIT) for p in _dir_files(path)}
        return {"kind": "dir", "files": files}
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return {"kind": "hub", "repo": src, "revision": cfg.revision or "main",
                "commit": resolve_hub(src, cfg.revision, "model")}
    return {"kind": "missing", "source": src}  # the run itself reports the problem


def data_fingerprint(source: str, hub_config: str | None = None, split: str = "train",
                     resolve_hub: HubResolver = hub_commit) -> dict[str, Any]:
    """Fingerprint of a text source: a builtin corpus, a local file, a directory of data files or a hub dataset."""
    if source.startswith("builtin:"):  # orchestrator.inputs.data.BUILTIN_SOURCES: the Python's own topics
        return {"kind": "builtin", "source": source, "python": platform.python_version()}
    path = Path(source).expanduser()
    if path.is_file():
        return {"kind": "file", **file_fingerprint(path, DATA_HASH_LIMIT)}
    if path.is_dir():
        files = {str(p.relative_to(path)): file_fingerprint(p, DATA_HASH_LIMIT)
                 for p in _dir_files(path, DATA_SUFFIXES)}
        return {"kind": "dir", "files": files}
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix in DATA_SUFFIXES:
        return {"kind": "missing", "source": source}
    return {"kind": "hub", "dataset": source, "config": hub_config, "split": split,
            "commit": resolve_hub(source, None, "dataset")}


# ------------------------------------------------------------ checkpoint inputs (resume)

#: the libraries whose versions a checkpoint records: another version may compute other numbers
CHECKPOINT_LIBRARIES = ("torch", "transformers", "deepspeed", "ray")


def _sha(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`CHECKPOINT_LIBRARIES` and rayprune (None: not installed)."""
    return {**_versions(*CHECKPOINT_LIBRARIES), "rayprune": __version__}


def windows_fingerprint(ids: Any) -> str:
    """SHA-256 of calibration windows: shape, dtype and the token ids' bytes (C order).

    Args:
        ids: the ``(N, L)`` windows, a torch tensor (on any device) or a numpy array; no torch import here.
    """
    import numpy as np

    if hasattr(ids, "detach"):  # a torch tensor
        ids = ids.detach().cpu().contiguous().numpy()
    arr = np.ascontiguousarray(ids)
    h = hashlib.sha256(json.dumps({"shape": list(arr.shape), "dtype": str(arr.dtype)}).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def checkpoint_inputs(model: ModelConfig, windows: Any = None, resolve_hub: HubResolver = hub_commit,
                      versions: dict[str, str | None] | None = None) -> dict[str, Any]:
    """What a distributed run's checkpoints were made from, beyond the config text.

    Args:
        model: the ``model`` section (identified as by the run key: hub commit or file hashes).
        windows: the calibration windows actually used; None when not known yet (an early check:
            ``windows`` and ``sha256`` are then None and :func:`inputs_mismatch` skips them).
        resolve_hub: hub revision resolver (tests).
        versions: library versions (default :func:`library_versions`; tests).

    Returns:
        ``{"sha256", "windows", "model", "libraries"}``: ``sha256`` hashes the other three,
        ``windows`` and ``model`` are SHA-256 hex digests, ``libraries`` maps name to version.
    """
    parts = {"windows": None if windows is None else windows_fingerprint(windows),
             "model": _sha(model_identity(model, resolve_hub)),
             "libraries": library_versions() if versions is None else dict(versions)}
    return {"sha256": None if windows is None else _sha(parts), **parts}


def inputs_mismatch(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Which recorded inputs differ from the current ones, in words; None when they match.

    Args:
        saved: the ``inputs`` a checkpoint's ``progress.json`` recorded (None: none recorded).
        current: :func:`checkpoint_inputs` of this run (``windows`` None: not compared).
    """
    if not isinstance(saved, dict) or not isinstance(saved.get("libraries"), dict):
        return "the inputs (the checkpoint records no inputs fingerprint)"
    what = []
    if current.get("windows") is not None and saved.get("windows") != current["windows"]:
        what.append("the calibration windows")
    if saved.get("model") != current["model"]:
        what.append("the model (files or hub commit)")
    libs = [f"{name} {saved['libraries'].get(name)} -> {version}" for name, version in current["libraries"].items()
            if saved["libraries"].get(name) != version]
    if libs:
        what.append(f"the libraries ({', '.join(libs)})")
    if not what and current.get("sha256") is not None and saved.get("sha256") != current["sha256"]:
        what.append("the inputs fingerprint")
    return " and ".join(what) or None


def inputs_refusal(ckpt_path: str | Path, what: str) -> str:
    """The one-line ``--resume`` refusal when a checkpoint was made from other inputs.

    Args:
        ckpt_path: the checkpoint directory.
        what: :func:`inputs_mismatch`'s answer (not None).
    """
    return (f"--resume: checkpoint {str(ckpt_path)!r} was made from other inputs: {what} differ; "
            "delete it to start over")
