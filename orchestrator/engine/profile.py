"""Measure this machine as an :class:`orchestrator.timing.Accelerator` (torch only; a few seconds).

The published profiles describe GPUs; a CPU is measured where it runs, with the threads a worker gets:
matmul FLOP/s at a transformer block's shape in fp32 and bf16, and elementwise bandwidth.
"""

from __future__ import annotations

import time

import torch

from orchestrator.engine.device import native_bf16
from orchestrator.pruning.masks import row_mask
from orchestrator.pruning.scores import wanda_score
from orchestrator.timing import Accelerator

#: bytes/s a CPU worker moves in a gloo collective (measured here: a 538 MB all-gather of SmolLM2's
#: parameters took 1.05 s between two ranks sharing two cores; docs/benchmarks.md)
CPU_LINK_BW = 0.5e9


def _rate(fn, work: float, repeats: int = 5) -> float:
    """``work`` per second of ``fn`` (the median of ``repeats`` timed calls after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return work / sorted(times)[len(times) // 2]


def measure_cpu(threads: int | None = None, tokens: int = 512, hidden: int = 1024, inter: int = 2816
                ) -> Accelerator:
    """This CPU as an accelerator, with ``threads`` torch threads: matmuls of the run's block shape
    ``(tokens, hidden) @ (hidden, inter)`` (``tokens``: one micro-batch's) in fp32 and bf16, the bandwidth
    of an elementwise add over 64 MiB tensors, and the scorer (a Wanda score, a stable row-wise sort, the mask)
    on an ``(inter, hidden)`` weight."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, hidden, generator=g).to(dtype)
            w = torch.randn(hidden, inter, generator=g).to(dtype)
            rates[dtype] = _rate(lambda x=x, w=w: x @ w, 2.0 * tokens * hidden * inter)
        a, b = torch.randn(1 << 24, generator=g), torch.randn(1 << 24, generator=g)
        bw = _rate(lambda: torch.add(a, b, out=a), 3 * a.numel() * 4.0)  # read two, write one
        w, norm = torch.randn(inter, hidden, generator=g), torch.rand(hidden, generator=g)
        score = _rate(lambda: row_mask(wanda_score(w, norm), 0.5), float(w.numel()), repeats=3)
    finally:
        torch.set_num_threads(before)
    n = threads or before
    return Accelerator(f"this CPU, {n} thread{'s' if n > 1 else ''} (measured)", rates[torch.float32],
                       rates[torch.bfloat16], bw, CPU_LINK_BW, score, native_bf16("cpu"))
