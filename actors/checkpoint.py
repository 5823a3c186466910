"""Phase checkpoints of a distributed run: gradient-statistic partitions and finished blocks.

Layout of a checkpoint directory (a sibling of the run's output directory, ``.NAME.ckpt``)::

    config.yaml                    the run config (resume checks its fingerprint)
    progress.json                  {"fingerprint", "world", "grad_steps", "grad_done", "blocks_done", "files"}
    grad/rank-00000-of-00002.safetensors   one rank's statistic partitions (``name::kind`` keys)
    blocks/block-00000.safetensors        masks (``mask::name``) and pruned weights (``weight::name``)
    blocks/block-00000.json               the block's report rows

Every file is written to a temp name and renamed; ``progress.json`` (written last, also
atomically) records each file's SHA-256, so a crash between the two leaves the previous
consistent state, and a corrupted file is detected on load. Worker ranks write their own
partitions, so on a multi-node cluster the directory must be on shared storage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from orchestrator.fileio import atomic_write_bytes
from orchestrator.fileio import sha256_file as sha256

log = logging.getLogger(__name__)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Atomically save tensors as safetensors; returns the file's SHA-256."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))
    return sha256(path)


def load_tensors(path: Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its SHA-256 when given.

    Raises:
        ValueError: the file's hash does not match (a corrupted or foreign checkpoint).
    """
    from safetensors.torch import load_file

    if expected_sha is not None and sha256(path) != expected_sha:
        raise ValueError(f"checkpoint file {path} does not match its recorded SHA-256")
    return load_file(str(path))


def grad_file(root: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` keeps its statistic partitions."""
    return root / "grad" / f"rank-{rank:05d}-of-{world:05d}.safetensors"


class CheckpointStore:
    """Progress of one distributed run, kept in ``root``.

    Args:
        root: the checkpoint directory (created on first write).
        fingerprint: the run config's work fingerprint; a store written by another config is refused.
        config_text: the run config as YAML, saved as ``config.yaml`` with the first checkpoint
            (``rayprune prune --resume`` reads it).
    """

    def __init__(self, root: Path, fingerprint: str, config_text: str | None = None) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.config_text = config_text
        self.progress = {"fingerprint": fingerprint, "world": None, "grad_steps": 0, "grad_done": False,
                         "blocks_done": 0, "files": {}}
        path = self.root / "progress.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint {self.root} was written by another config "
                                 f"(fingerprint {saved.get('fingerprint')} != {fingerprint})")
            self.progress = saved

    def _commit(self) -> None:
        if self.config_text is not None and not (self.root / "config.yaml").is_file():
            atomic_write_bytes(self.root / "config.yaml", self.config_text.encode())
        atomic_write_bytes(self.root / "progress.json", json.dumps(self.progress, indent=1).encode())

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

    def grad_files(self, world: int) -> dict[int, tuple[str, str]]:
        """rank -> (path, sha256) of the saved partitions."""
        return {r: (str(grad_file(self.root, r, world)), self.progress["files"][f"grad/{r}"]) for r in range(world)
                if f"grad/{r}" in self.progress["files"]}

    def commit_grad(self, world: int, steps: int, hashes: list[str], done: bool) -> None:
        """Record partitions the ranks have just written (``hashes[r]`` from rank r)."""
        for r, h in enumerate(hashes):
            self.progress["files"][f"grad/{r}"] = h
        self.progress.update(world=world, grad_steps=steps, grad_done=done)
        self._commit()

    def save_block(self, index: int, masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                   rows: list[dict]) -> None:
        """Persist one finished block and advance ``blocks_done``."""
        if index != self.blocks_done:
            raise ValueError(f"block {index} saved out of order (blocks_done={self.blocks_done})")
        tensors = {f"mask::{k}": v.to(torch.bool) for k, v in masks.items()}
        tensors.update({f"weight::{k}": v for k, v in weights.items()})
        h = save_tensors(self.root / "blocks" / f"block-{index:05d}.safetensors", tensors)
        rows_path = self.root / "blocks" / f"block-{index:05d}.json"
        atomic_write_bytes(rows_path, json.dumps(rows).encode())
        self.progress["files"][f"block/{index}"] = h
        self.progress["files"][f"rows/{index}"] = sha256(rows_path)
        self.progress["blocks_done"] = index + 1
        self._commit()

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
        """``(masks, weights, rows)`` of a saved block (hashes checked)."""
        path = self.root / "blocks" / f"block-{index:05d}.safetensors"
        t = load_tensors(path, self.progress["files"][f"block/{index}"])
        rows_path = self.root / "blocks" / f"block-{index:05d}.json"
        if sha256(rows_path) != self.progress["files"][f"rows/{index}"]:
            raise ValueError(f"checkpoint file {rows_path} does not match its recorded SHA-256")
        masks = {k.split("::", 1)[1]: v for k, v in t.items() if k.startswith("mask::")}
        weights = {k.split("::", 1)[1]: v for k, v in t.items() if k.startswith("weight::")}
        return masks, weights, json.loads(rows_path.read_text())
