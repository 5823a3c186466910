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

Loading is the mirror image: :class:`RangeReader` reads one rank's ZeRO-3 partition of a tensor (a
contiguous range of its flattened elements, one byte range of the file), so a rank reads its share of
the checkpoint's bytes and nothing else.
"""

from __future__ import annotations

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
    """Atomically write CPU tensors as one safetensors file (a synced temp file, then one rename).

    The tensors are serialised straight from their memory (no second copy of the file's bytes), and the
    file is hashed from the page cache once written.

    Returns:
        ``{"sha256", "bytes", "names"}`` of the written file.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    from orchestrator.fileio import current_umask, fsync_path, sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        sha = sha256_file(tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"sha256": sha, "bytes": size, "names": sorted(tensors)}


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


#: safetensors' dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class RangeReader:
    """Reads contiguous ranges of a safetensors file's flattened tensors with plain reads.

    safetensors stores each tensor row-major at the offsets its JSON header names, so elements
    ``[lo, hi)`` of the flattened tensor are one byte range. ``safe_open`` memory-maps the file, and every
    page a rank touches stays in its resident set while the file is open; these reads keep only what was
    asked for. Use as a context manager.

    Args:
        path: a ``.safetensors`` file.

    Raises:
        ValueError: the file is not a safetensors file.
    """

    def __init__(self, path: str | Path) -> None:
        import struct

        self.path = str(path)
        self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close() / __exit__
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as exc:
            self._f.close()
            raise ValueError(f"{self.path} is not a safetensors file ({exc})") from None
        self._base = 8 + n
        self.tensors = {k: v for k, v in header.items() if k != "__metadata__"}

    def dtype(self, key: str) -> torch.dtype:
        """The tensor's dtype in the file."""
        return _DTYPES[self.tensors[key]["dtype"]]

    def numel(self, key: str) -> int:
        """Elements of the tensor."""
        n = 1
        for s in self.tensors[key]["shape"]:
            n *= int(s)
        return n

    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of tensor ``key`` flattened, ``(hi - lo,)`` in the file's dtype (read exactly)."""
        dtype = self.dtype(key)
        out = torch.empty(max(0, hi - lo), dtype=dtype)
        if hi <= lo:
            return out
        size = out.element_size()
        start = self._base + int(self.tensors[key]["data_offsets"][0]) + lo * size
        view = memoryview(out.view(torch.uint8).numpy())  # the tensor's own bytes
        self._f.seek(start)
        got = 0
        while got < len(view):
            n = self._f.readinto(view[got:])
            if not n:
                raise ValueError(f"{self.path}: tensor {key!r} ends before its header says")
            got += n
        return out

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


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
