"""Folding device tensors into host accumulators without a synchronous copy per fold.

``backend.offload_stats`` keeps the gradient-statistic partitions in pinned host memory. A plain
``buf.add_(out.to("cpu"))`` would copy each reduce-scattered partition into new pageable memory and
stall the GPU's stream on every fold; :class:`HostFolder` copies into reused pinned staging buffers
with ``non_blocking=True``, records an event, and adds the staged copy into its accumulator only
when a later fold (or :meth:`HostFolder.flush`) needs the staging buffer back.
"""

from __future__ import annotations

from collections import deque

import torch


class HostFolder:
    """Adds device tensors into host (pinned) accumulators, overlapping the copies with the GPU's work.

    Args:
        depth: copies kept in flight before the oldest is waited for and added.
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self.pending: deque[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self.free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}  # staging buffers by (numel, dtype)

    def add(self, buf: torch.Tensor, src: torch.Tensor) -> None:
        """``buf += src`` (``buf`` and ``src`` of one shape), at once unless ``src`` is on a GPU and ``buf`` pinned."""
        if buf.device == src.device:
            buf.add_(src)
            return
        if src.device.type != "cuda" or not buf.is_pinned():
            buf.add_(src.to(buf.device))
            return
        key = (src.numel(), src.dtype)
        stack = self.free.setdefault(key, [])
        staging = stack.pop() if stack else torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staging.view(-1).copy_(src.reshape(-1), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((done, staging, buf, src))  # ``src`` stays alive until its copy has finished
        while len(self.pending) > self.depth:
            self._settle()

    def _settle(self) -> None:
        done, staging, buf, _src = self.pending.popleft()
        done.synchronize()
        buf.add_(staging.view_as(buf))
        self.free[(staging.numel(), staging.dtype)].append(staging)

    def flush(self) -> None:
        """Wait for every copy in flight and add it into its accumulator."""
        while self.pending:
            self._settle()
