"""Phase checkpoints of a distributed run: gradient-statistic partitions and finished blocks.

Layout of a checkpoint directory (a sibling of the run's output directory, ``.NAME.ckpt``)::

    config.yaml                    the run config (resume checks its fingerprint)
    progress.json                  {"format", "fingerprint", "inputs", "world", "grad_steps", "grad_done",
                                    "blocks_done", "files": {key: {"path", "sha256"}}}
    grad/rank-00000-of-00002.step-000012.safetensors   one rank's statistic partitions after 12 local
                                                       sequences (``name::kind`` keys)
    model/model-block-00000.safetensors   block 0's pruned tensors, written by its rank: the run's published
    model/model-outside.safetensors       checkpoint files (:mod:`orchestrator.outputs.shards`), moved
    masks/masks-block-00000.safetensors   into the run directory at the end, never written twice
    blocks/block-00000.json               the block's report rows (the driver)

Commit protocol: a data file is only ever written under a name the committed ``progress.json``
does not name (gradient partitions carry their step in the name; a block's files are written
once, before the commit that names them). ``progress.json`` is then replaced atomically; it
names every file of the new state with its SHA-256. Only after that commit are the files of the
previous state deleted. A crash at any point therefore leaves the last committed
``progress.json`` and every file it names intact: loading reads only those files (hash-checked,
so a corrupted file is detected), and files no commit names (the versions of a save that never
got committed, temp files of an interrupted write) are ignored and removed by :meth:`CheckpointStore.clean`.

``inputs`` (written by :func:`orchestrator.inputs.fingerprints.checkpoint_inputs` and compared by the
driver, not here) fingerprints the calibration windows, the model revision and the library
versions. Worker ranks write their own partitions, so on a multi-node cluster the directory must
be on shared storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from orchestrator.fileio import atomic_write_bytes
from orchestrator.fileio import sha256_file as sha256

log = logging.getLogger(__name__)

FORMAT = 3  # 1: unversioned grad files; 2: blocks' tensors written by the driver (both refused)
DATA_DIRS = ("grad", "blocks", "model", "masks", "records")
_ROOT_FILES = ("progress.json", "config.yaml")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Atomically save tensors as safetensors; returns the file's SHA-256."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its SHA-256 when given.

    Raises:
        ValueError: the file's hash does not match (a corrupted or foreign checkpoint).
    """
    from safetensors.torch import load_file

    if expected_sha is not None and sha256(path) != expected_sha:
        raise ValueError(f"checkpoint file {path} does not match its recorded SHA-256")
    return load_file(str(path))


def _check_entries(root: Path, saved: dict[str, Any]) -> None:
    """Refuse a ``progress.json`` whose file entries leave the checkpoint directory.

    Every recorded path must be relative, free of ``..``, below one of :data:`DATA_DIRS` and, with
    symbolic links resolved, inside ``root``: a tampered checkpoint can make a resume read or move
    nothing outside it.

    Raises:
        ValueError: naming the first offending entry.
    """
    from pathlib import PurePosixPath

    files = saved.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"checkpoint {root}: progress.json has no file table")
    top = root.resolve()
    for key, entry in files.items():
        rel = entry.get("path") if isinstance(entry, dict) else None
        parts = PurePosixPath(rel).parts if isinstance(rel, str) and rel else ()
        if (not parts or PurePosixPath(rel).is_absolute() or ".." in parts or parts[0] not in DATA_DIRS
                or not isinstance(entry.get("sha256"), str)):
            raise ValueError(f"checkpoint {root}: progress.json entry {str(key)[:80]!r} names {str(rel)[:120]!r}, "
                             f"not a file below {', '.join(DATA_DIRS)}")
        if not (root / rel).resolve().is_relative_to(top):
            raise ValueError(f"checkpoint {root}: progress.json entry {str(key)[:80]!r} ({rel!r}) leads outside "
                             "the checkpoint directory")


def grad_name(rank: int, world: int, steps: int) -> str:
    """Relative path of rank ``rank`` of ``world``'s partitions after ``steps`` local sequences."""
    return f"grad/rank-{rank:05d}-of-{world:05d}.step-{steps:06d}.safetensors"


def block_names(index: int) -> tuple[str, str]:
    """Relative paths of block ``index``'s tensors and report rows."""
    return f"blocks/block-{index:05d}.safetensors", f"blocks/block-{index:05d}.json"


class CheckpointStore:
    """Progress of one distributed run, kept in ``root``.

    Args:
        root: the checkpoint directory (created on first write).
        fingerprint: the run config's work fingerprint; a store written by another config is refused.
        config_text: the run config as YAML, saved as ``config.yaml`` with the first checkpoint
            (``rayprune prune --resume`` reads it).
        inputs: the inputs fingerprint recorded in a new store (a resumed store keeps the saved
            one in :attr:`saved_inputs` for the driver to compare).

    Raises:
        ValueError: ``root`` holds a checkpoint of another config or of an older layout.
    """

    def __init__(self, root: Path, fingerprint: str, config_text: str | None = None,
                 inputs: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.config_text = config_text
        self.progress: dict[str, Any] = {"format": FORMAT, "fingerprint": fingerprint, "inputs": inputs,
                                         "world": None, "grad_steps": 0, "grad_done": False, "blocks_done": 0,
                                         "files": {}}
        self.resumed = False
        path = self.root / "progress.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint {self.root} was written by another config "
                                 f"(fingerprint {saved.get('fingerprint')} != {fingerprint})")
            if saved.get("format") != FORMAT:
                raise ValueError(f"checkpoint {self.root} has layout {saved.get('format', 1)}, not {FORMAT} "
                                 "(an older rayprune wrote it); delete it to start over")
            _check_entries(self.root, saved)
            self.progress = saved
            self.resumed = True

    @property
    def saved_inputs(self) -> dict[str, Any] | None:
        """The inputs fingerprint recorded in ``progress.json``."""
        return self.progress.get("inputs")

    def _path(self, key: str) -> tuple[Path, str]:
        entry = self.progress["files"][key]
        return self.root / entry["path"], entry["sha256"]

    def committed(self) -> set[str]:
        """Relative paths of the data files the committed progress names."""
        return {e["path"] for e in self.progress["files"].values()}

    def _commit(self, clean: tuple[str, ...] = ("grad",)) -> None:
        """Write ``progress.json`` (atomically), then delete what it no longer names in the folders ``clean``
        (the gradient partitions' older versions; block files are written once, by ranks that may be
        writing the next block while this commit runs)."""
        if self.config_text is not None and not (self.root / "config.yaml").is_file():
            atomic_write_bytes(self.root / "config.yaml", self.config_text.encode())
        atomic_write_bytes(self.root / "progress.json", json.dumps(self.progress, indent=1).encode())
        self.clean(clean)

    def clean(self, folders: tuple[str, ...] = DATA_DIRS) -> list[str]:
        """Delete files no commit names: older versions, uncommitted saves, interrupted temp files.

        Only safe while no rank is writing into ``folders`` (between steps of the driver; for the block
        folders, before an attempt starts). Returns the removed relative paths.
        """
        keep = self.committed()
        removed = []
        for sub in folders:
            folder = self.root / sub
            for p in sorted(folder.iterdir()) if folder.is_dir() else []:
                rel = f"{sub}/{p.name}"
                if p.is_file() and rel not in keep:
                    p.unlink(missing_ok=True)
                    removed.append(rel)
        for p in sorted(self.root.glob(".*")) if self.root.is_dir() else []:
            if p.is_file() and p.name.startswith(tuple(f".{n}." for n in _ROOT_FILES)):  # atomic_write temps
                p.unlink(missing_ok=True)
                removed.append(p.name)
        if removed:
            log.info("checkpoint %s: removed %d uncommitted or superseded file(s)", self.root, len(removed))
        return removed

    @property
    def grad_steps(self) -> int:
        """Per-rank sequences whose statistics are in the saved partitions."""
        return int(self.progress["grad_steps"])

    @property
    def grad_done(self) -> bool:
        """Whether the gradient pass finished."""
        return bool(self.progress["grad_done"])

    @property
    def blocks_done(self) -> int:
        """Blocks whose masks and weights are saved."""
        return int(self.progress["blocks_done"])

    def world_matches(self, world: int) -> bool:
        """Whether saved partitions (if any) were written by ``world`` ranks."""
        return self.progress["world"] in (None, world)

    def grad_path(self, rank: int, world: int, steps: int) -> Path:
        """Where rank ``rank`` writes its partitions after ``steps`` local sequences (a new version).

        Raises:
            ValueError: that name is committed already (writing it would break the last consistent state).
        """
        rel = grad_name(rank, world, steps)
        if rel in self.committed():
            raise ValueError(f"checkpoint {self.root}: {rel} is committed and must not be rewritten")
        return self.root / rel

    def grad_files(self, world: int) -> dict[int, tuple[str, str]]:
        """rank -> (path, sha256) of the committed partitions."""
        out = {}
        for r in range(world):
            if f"grad/{r}" in self.progress["files"]:
                path, sha = self._path(f"grad/{r}")
                out[r] = (str(path), sha)
        return out

    def commit_grad(self, world: int, steps: int, hashes: list[str], done: bool) -> None:
        """Commit the partitions the ranks have just written to :meth:`grad_path` (``hashes[r]`` from rank r);
        the previous version is deleted after the commit."""
        for r, h in enumerate(hashes):
            self.progress["files"][f"grad/{r}"] = {"path": grad_name(r, world, steps), "sha256": h}
        self.progress.update(world=world, grad_steps=steps, grad_done=done)
        self._commit()

    def commit_files(self, record: dict[str, Any], key: str) -> None:
        """Name the files of ``record`` (``{"files": {rel: {"sha256", "bytes", "names"}}}``, written by a rank)
        under ``key/<rel>`` in the progress, without committing yet."""
        for rel, entry in record["files"].items():
            self.progress["files"][f"{key}/{rel}"] = {"path": rel, **entry}

    def commit_outside(self, record: dict[str, Any]) -> None:
        """Commit the file of the parameters outside the blocks (written by rank 0)."""
        self.commit_files(record, "outside")
        self.progress["outside_done"] = True
        self._commit(())

    @property
    def outside_done(self) -> bool:
        """Whether the parameters outside the blocks are written."""
        return bool(self.progress.get("outside_done"))

    def commit_block(self, index: int, record: dict[str, Any], rows: list[dict]) -> None:
        """Commit block ``index``: its tensor and mask files (``record`` from the rank that wrote them) and its
        report rows (written here); advances ``blocks_done``."""
        if index != self.blocks_done or record.get("index") != index:
            raise ValueError(f"block {record.get('index')} committed as {index} out of order "
                             f"(blocks_done={self.blocks_done})")
        _, r_rel = block_names(index)
        atomic_write_bytes(self.root / r_rel, json.dumps(rows).encode())
        self.commit_files(record, f"block/{index}")
        self.progress["files"][f"rows/{index}"] = {"path": r_rel, "sha256": sha256(self.root / r_rel)}
        self.progress["blocks_done"] = index + 1
        self._commit(())

    def block_tensors(self, index: int) -> tuple[str, str]:
        """``(path, sha256)`` of committed block ``index``'s tensor file (what a replaying rank reads)."""
        from orchestrator.outputs.shards import MODEL_DIR, block_shard

        return tuple(str(x) for x in self._path(f"block/{index}/{MODEL_DIR}/{block_shard(index)}"))

    def block_rows(self, index: int) -> list[dict]:
        """The report rows of committed block ``index`` (hash checked)."""
        rows_path, rows_sha = self._path(f"rows/{index}")
        if sha256(rows_path) != rows_sha:
            raise ValueError(f"checkpoint file {rows_path} does not match its recorded SHA-256")
        return json.loads(rows_path.read_text())

    def shard_files(self) -> dict[str, dict[str, Any]]:
        """Every committed checkpoint file of the pruned model and its masks: relative path -> its entry
        (``path``, ``sha256``, ``bytes``, ``names``)."""
        return {e["path"]: e for k, e in self.progress["files"].items() if k.startswith(("block/", "outside/"))}
