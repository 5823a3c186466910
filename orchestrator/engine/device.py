"""Device placement: the one answer to "which device is mine, and how do forwards run there".

Every engine function takes a :class:`Placement` instead of guessing: tensors it creates are
created on ``placement.device``, tensors it receives are moved there with :meth:`Placement.put`,
block forwards run under :meth:`Placement.autocast` (the device's own autocast, so bf16 forwards
on a GPU are CUDA autocast and on a CPU CPU autocast), and results go back to the caller on the
CPU with :func:`to_cpu`. Torch only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.inputs.config import resolve_compute_dtype
from orchestrator.inputs.models import TORCH_DTYPES
from orchestrator.pruning.stats import AUTOCAST_DEVICE_TYPES

NATIVE_BF16_ENV = "RAYPRUNE_NATIVE_BF16"  # 0/1: what ``auto`` compute dtypes resolve with (tests pin 0)


@dataclass(frozen=True)
class Placement:
    """Where an engine step runs.

    Attributes:
        device: the device every tensor of the step lives on.
        autocast_dtype: dtype of autocast forwards (None: the parameters' own dtype).
    """

    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, device: str | torch.device = "cpu", forward_dtype: str = "float32") -> Placement:
        """A placement from a device and a config dtype name (``float32`` = no autocast; ``auto`` resolved for
        ``device`` by :func:`native_bf16`)."""
        if forward_dtype == "auto":
            forward_dtype = resolve_compute_dtype(forward_dtype, native_bf16(device))
        amp = None if forward_dtype == "float32" else TORCH_DTYPES[forward_dtype]
        return cls(torch.device(device), amp)

    def put(self, obj: Any) -> Any:
        """``obj`` (a tensor, or a tuple/list/dict of them, nested) with every tensor on the device."""
        return move(obj, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast on this device's type, or nothing when no autocast dtype is set (or none exists)."""
        if self.autocast_dtype is None or self.device.type not in AUTOCAST_DEVICE_TYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def move(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside ``obj`` (tuples, lists, dicts, nested) moved to ``device``; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor on the CPU (what goes back to the coordinator)."""
    return move(obj, "cpu")


def visible_device_index(accelerator_ids: list[str], visible: str | None) -> int:
    """Index of this process's first assigned accelerator among the devices it can see.

    Ray narrows ``CUDA_VISIBLE_DEVICES`` of an actor to the GPUs it assigned, so the one GPU of a
    one-GPU actor is ``cuda:0`` whatever its physical id; where the visible list is wider (set by
    hand), the assigned id's position in it is the device index. Never derive it from the rank.

    Args:
        accelerator_ids: ids Ray assigned (``get_accelerator_ids()["GPU"]``), non-empty.
        visible: the ``CUDA_VISIBLE_DEVICES`` value (None or empty: every device visible, ids are ordinals).

    Raises:
        ValueError: the assigned id is not among the visible devices.
    """
    first = str(accelerator_ids[0])
    if not visible or visible == "NoDevFiles":
        return int(first)
    ids = [v.strip() for v in visible.split(",")]
    if first not in ids:
        raise ValueError(f"accelerator {first} is not visible (CUDA_VISIBLE_DEVICES={visible!r})")
    return ids.index(first)


def local_device(accelerator_ids: list[str] | None = None) -> torch.device:
    """This process's device: its assigned GPU where CUDA is usable, else the CPU."""
    if accelerator_ids and torch.cuda.is_available():
        return torch.device("cuda", visible_device_index(accelerator_ids, os.environ.get("CUDA_VISIBLE_DEVICES")))
    return torch.device("cpu")



def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively, so bf16 autocast is faster than fp32 there.

    True for CUDA GPUs of compute capability 8.0 or later (Ampere on) and for CPUs with AVX512-BF16
    or AMX tiles (oneDNN's bf16 kernels; other CPUs emulate bf16, slower than fp32). The environment
    variable ``RAYPRUNE_NATIVE_BF16`` (``0`` or ``1``) overrides the answer for every device of the process.
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def device_memory_bytes(device: torch.device | str, sharers: int = 1) -> int:
    """Memory of ``device`` one process may plan with: a GPU's total memory, or the host's physical
    memory divided among the ``sharers`` processes of this node that use it."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: plan as if memory were ample
        return 1 << 50
    return host // max(1, sharers)
