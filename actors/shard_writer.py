"""A rank's writes of the pruned checkpoint: block files on one background thread, the block before last settled.

Block ``i``'s file is written by rank ``i % W`` (:func:`orchestrator.outputs.shards.writer_rank`)
while the ranks prune block ``i + 1``; the next call settles it and hands its record (file, SHA-256,
bytes, tensor names) to the driver, which commits it. The files go straight into the run's shared
checkpoint directory (``model/``, ``masks/``); the coordinator later moves them into the published
run, so nothing is written twice and no tensor passes through the driver.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from orchestrator.fileio import atomic_write_bytes
from orchestrator.outputs.shards import MASKS_DIR, MODEL_DIR, block_shard, mask_shard, write_tensors

log = logging.getLogger(__name__)


RECORDS_DIR = "records"


def record_path(root: Path, index: int) -> Path:
    """Where the rank leaves block ``index``'s record once both of its files are written."""
    return root / RECORDS_DIR / f"block-{index:05d}.json"


def write_block_files(root: Path, index: int, tensors: dict[str, torch.Tensor],
                      masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write block ``index``'s tensors and masks (CPU, full names) under ``root``; returns its record.

    The record is also left in ``records/`` (after both files): when an attempt fails before the record
    reaches the driver, the driver still commits the block (:func:`adopt_written`).
    """
    model_rel = f"{MODEL_DIR}/{block_shard(index)}"
    masks_rel = f"{MASKS_DIR}/{mask_shard(index)}"
    record = {"index": index, "root": str(root), "files": {model_rel: write_tensors(root / model_rel, tensors),
                                                           masks_rel: write_tensors(root / masks_rel, masks)}}
    atomic_write_bytes(record_path(root, index), json.dumps(record).encode())
    return record


def adopt_written(root: Path, rows: dict[int, list[dict]]) -> list[dict[str, Any]]:
    """Records of the blocks in ``rows`` (pruned, not committed) whose files a rank finished writing, in
    order up to the first missing one (what a failed attempt leaves for the driver to commit)."""
    out = []
    for index in sorted(rows):
        path = record_path(root, index)
        if not path.is_file():
            break
        out.append(json.loads(path.read_text()))
    return out


class ShardWriter:
    """At most one block write in flight on a background thread of this rank.

    :meth:`submit` settles the previous write first (its error surfaces there) and returns its record;
    :meth:`settle` returns the last one.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rayprune-shards")
        self._pending: Future | None = None

    def settle(self) -> dict[str, Any] | None:
        """Wait for the write in flight; returns its record (None when there was none)."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def submit(self, root: Path, index: int, tensors: dict[str, torch.Tensor],
               masks: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Queue block ``index``'s write (the tensors must not change afterwards); returns the previous record
        (the caller normally settled it already: :meth:`settle` after its own work)."""
        done = self.settle()
        self._pending = self._pool.submit(write_block_files, root, index, tensors, masks)
        return done

    def close(self) -> None:
        """Drop a write in flight's result and stop the thread (a failed attempt's files are not committed)."""
        try:
            self.settle()
        except Exception:  # noqa: BLE001 - the attempt is over; the driver never commits this file
            log.debug("a block write failed while closing", exc_info=True)
        self._pool.shutdown(wait=True)
