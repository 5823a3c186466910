"""The sharded checkpoint a distributed run writes: names, files, indexes, slices (no Ray, no DeepSpeed).

A distributed run never gathers the model in one process. Its ranks write the pruned checkpoint
themselves, one block per file, and the coordinator only writes the small files around them::

    model/
      config.json, generation_config.json, tokenizer files     the coordinator
      model.safetensors.index.json                             the coordinator (weight name -> file)
      model-outside.safetensors                                rank 0: every parameter outside the blocks
      model-block-00000.safetensors ...                        rank ``i % W``: block i, pruned
    masks.safetensors.index.json                               the coordinator
    masks/masks-block-00000.safetensors ...                    rank ``i % W``: block i's bool masks

``AutoModelForCausalLM.from_pretrained("model")`` reads it as any sharded Hugging Face checkpoint;
:func:`load_masks` reads either mask layout (this one, or the single ``masks.safetensors`` of a
one-process run).

Loading is the mirror image: :func:`read_flat_range` reads one rank's ZeRO-3 partition of a tensor
(a contiguous range of its flattened elements) through safetensors' lazy slices, so a rank reads
its share of the checkpoint's bytes, not the whole file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from orchestrator.fileio import atomic_write_bytes

MODEL_DIR = "model"
MASKS_DIR = "masks"
MODEL_INDEX = "model.safetensors.index.json"
MASKS_INDEX = "masks.safetensors.index.json"
OUTSIDE_SHARD = "model-outside.safetensors"


def block_shard(index: int) -> str:
    """File name of block ``index``'s pruned tensors inside ``model/``."""
    return f"model-block-{index:05d}.safetensors"


def mask_shard(index: int) -> str:
    """File name of block ``index``'s masks inside ``masks/``."""
    return f"masks-block-{index:05d}.safetensors"


def writer_rank(index: int, world: int) -> int:
    """The rank that writes block ``index``'s files (round robin, so writes spread over the ranks)."""
    return index % world


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Atomically write CPU tensors as one safetensors file.

    Returns:
        ``{"sha256", "bytes", "names"}`` of the written file (hashed from the bytes in memory, not re-read).
    """
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "names": sorted(tensors)}


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """A Hugging Face ``*.safetensors.index.json`` (sorted weight map, total tensor bytes)."""
    body = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(path, (json.dumps(body, indent=2) + "\n").encode())


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(numel / 8)`` uint8, little-endian bit order within each byte (1/8 of bool's bytes)."""
    flat = mask.reshape(-1).to(torch.uint8)  # (n,)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)  # (ceil(n/8),)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (ceil(n/8), 8)
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)


def read_flat_range(handle: Any, key: str, lo: int, hi: int) -> tuple[torch.Tensor, int]:
    """Elements ``[lo, hi)`` of tensor ``key`` flattened, read through a lazy slice of a ``safe_open`` handle.

    Only the rows that hold the range are read (for a 2-D ``(R, C)`` tensor, at most ``(hi - lo) / C + 2`` rows).

    Returns:
        ``((hi - lo,) tensor in the file's dtype, bytes read)``.
    """
    sl = handle.get_slice(key)
    shape = sl.get_shape()
    if hi <= lo:
        return torch.empty(0), 0
    if len(shape) <= 1:
        part = sl[lo:hi]
        return part.reshape(-1), part.numel() * part.element_size()
    row = 1
    for s in shape[1:]:
        row *= int(s)
    r0, r1 = lo // row, (hi + row - 1) // row
    rows = sl[r0:r1]  # (r1 - r0, ...)
    flat = rows.reshape(-1)[lo - r0 * row : hi - r0 * row]
    return flat, rows.numel() * rows.element_size()


def checkpoint_keys(model_dir: str | Path) -> dict[str, str] | None:
    """Tensor name -> safetensors file of a checkpoint directory (index or single file); None without safetensors."""
    d = Path(model_dir)
    index = d / MODEL_INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = d / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return None


def load_masks(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every mask of a run directory (bool, True = pruned), from either layout.

    Raises:
        FileNotFoundError: the run has no masks.
    """
    from safetensors.torch import load_file

    d = Path(run_dir)
    if (d / "masks.safetensors").is_file():
        return load_file(str(d / "masks.safetensors"))
    index = d / MASKS_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{d} has neither masks.safetensors nor {MASKS_INDEX}")
    out: dict[str, torch.Tensor] = {}
    for rel in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(str(d / rel)))
    return out
