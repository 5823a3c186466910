"""The coordinator's part of a distributed run's checkpoint: metadata around the files the ranks wrote.

The ranks wrote every tensor (:mod:`orchestrator.outputs.shards`); here the files are linked (not
copied) from the run's checkpoint directory into the run's temp directory, and the small files
are written beside them: the model's config and generation config, the tokenizer, the two
``*.safetensors.index.json`` and, for the manifest, the hashes the ranks computed while writing.
No tensor is read.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from orchestrator.outputs.shards import MASKS_DIR, MASKS_INDEX, MODEL_DIR, MODEL_INDEX, write_index

log = logging.getLogger(__name__)


def link_file(src: Path, dst: Path) -> None:
    """Give ``src`` the second name ``dst`` (a hard link: no bytes copied; a copy across filesystems).

    The checkpoint keeps its name until the run is published, so a failure after this step can still
    resume from the checkpoint.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def place_shards(run_tmp: Path, root: Path, files: dict[str, dict[str, Any]], model_config: Any,
                 generation_config: Any, tokenizer: Any) -> dict[str, str]:
    """Link the ranks' files from ``root`` into ``run_tmp`` and write the metadata around them.

    Args:
        run_tmp: the run's temp directory (:class:`~orchestrator.outputs.artifacts.RunWriter`).
        root: where the ranks wrote (``model/...``, ``masks/...``).
        files: relative path -> ``{"sha256", "bytes", "names"}`` of every file the ranks wrote.
        model_config: the model's ``transformers`` config (saved as ``model/config.json``).
        generation_config: its generation config, or None.
        tokenizer: the tokenizer (saved into ``model/``).

    Returns:
        Relative path inside the run -> SHA-256, for every linked file (the manifest uses them as they are).

    Raises:
        FileNotFoundError: a recorded file is missing under ``root``.
    """
    weight_map: dict[str, str] = {}
    mask_map: dict[str, str] = {}
    sizes = {MODEL_DIR: 0, MASKS_DIR: 0}
    hashes: dict[str, str] = {}
    for rel, entry in sorted(files.items()):
        folder, name = rel.split("/", 1)
        src = root / rel
        if not src.is_file():
            raise FileNotFoundError(f"the ranks recorded {rel} but {src} does not exist")
        link_file(src, run_tmp / rel)
        hashes[rel] = entry["sha256"]
        sizes[folder] += int(entry["bytes"])
        target = weight_map if folder == MODEL_DIR else mask_map
        for tensor in entry["names"]:
            target[tensor] = name if folder == MODEL_DIR else f"{MASKS_DIR}/{name}"
    model_dir = run_tmp / MODEL_DIR
    write_index(model_dir / MODEL_INDEX, weight_map, sizes[MODEL_DIR])
    write_index(run_tmp / MASKS_INDEX, mask_map, sizes[MASKS_DIR])
    model_config.save_pretrained(model_dir)
    if generation_config is not None:
        generation_config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    log.info("checkpoint assembled from %d rank-written files (%.1f MiB of tensors, %.1f MiB of masks)",
             len(files), sizes[MODEL_DIR] / 2**20, sizes[MASKS_DIR] / 2**20)
    return hashes


def sparsity_from_rows(rows: list[dict]) -> tuple[float, int, int]:
    """``(fraction, zeros, total)`` over the pruned weights, from the ranks' report rows (no tensor read)."""
    zeros = sum(int(r["zeros"]) for r in rows)
    total = 0
    for r in rows:
        n = 1
        for s in r["shape"]:
            n *= int(s)
        total += n
    return zeros / max(total, 1), zeros, total
