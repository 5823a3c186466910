"""Content-addressed runs for scheduled compression (``rayprune prune --if-changed``).

A *run key* is the SHA-256 of a canonical JSON document holding

* the resolved config's fields that decide the model or what is measured (the ``result`` and
  ``measure`` roles declared on each field in :mod:`orchestrator.inputs.config`; ``execution``
  fields such as ``output.dir``, ``backend.address``, ``backend.workers`` or ``eval.workers``
  only say where or how a run executes),
* the identity of the model revision (:func:`model_identity`),
* the fingerprint of the calibration data, of the structured-recovery training data when it is
  its own source, and, when evaluation runs, of the evaluation data and of local zero-shot task
  files (:func:`data_fingerprint`),
* the rayprune version and :data:`KEY_SCHEMA`.

Choices, made so that a key never stays the same when the inputs changed in a way that
matters, at the cost of an occasional needless recompute:

* Files up to a size limit are hashed by content (SHA-256); bigger ones are identified
  by resolved path, size and ``mtime_ns`` (:data:`DATA_HASH_LIMIT` for data,
  :data:`MODEL_HASH_LIMIT` for files of a model directory, so ``config.json``, tokenizer
  files and index files are always read and multi-GB weight shards are only stat'ed).
  Rewriting a big file in place with the same size and mtime goes unnoticed; copying a
  model elsewhere or touching it triggers a new run.
* Hub models are identified by ``model.revision`` resolved to a commit through
  ``huggingface_hub`` when the hub is reachable (a 40-hex revision is taken as is);
  offline the literal revision (``main`` when unset) is used.
* Builtin models by their pip package and member (pin the package in
  :data:`orchestrator.inputs.models.BUILTIN` to make its version part of the key); ``tiny``
  models by their shape/seed and the torch/transformers versions that initialise them.
* ``calibration.source: generate`` by the generation settings (and the model identity).

The key of a finished run is written into the run (``run_key`` file and ``report.json``)
and an index ``<output parent>/.rayprune-index/<key>`` points at the run directory; both
are written atomically. ``{key}`` in ``output.dir`` is replaced by the first
:data:`SHORT_KEY_LEN` hex digits of the key, e.g. ``output.dir=runs/nightly-{key}``.

The same pieces fingerprint what a distributed run's checkpoints were made from
(:func:`checkpoint_inputs`, compared on resume by :func:`inputs_mismatch`): the calibration
windows actually used, the model identity and the versions of :data:`CHECKPOINT_LIBRARIES`.

This module imports neither Ray nor torch (torch only for builtin model names).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.errors import UsageError
from orchestrator.fileio import atomic_write_bytes, sha256_file
from orchestrator.inputs.config import MEASURE, RESULT, ModelConfig, RunConfig

log = logging.getLogger(__name__)

KEY_SCHEMA = 1
SHORT_KEY_LEN = 12
KEY_PLACEHOLDER = "{key}"
INDEX_DIR = ".rayprune-index"
KEY_FILE = "run_key"
DATA_HASH_LIMIT = 256 * 2**20
MODEL_HASH_LIMIT = 8 * 2**20
TASKS_DIR = Path(__file__).parents[1] / "evaluation" / "tasks"  # builtin zero-shot tasks: ``<name>.jsonl``
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
