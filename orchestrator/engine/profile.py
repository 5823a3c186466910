"""Measure this machine as an :class:`orchestrator.timing.Accelerator` (torch only; a few seconds).

The published profiles describe GPUs; a CPU is measured where it runs, with the threads a worker gets:
matmul FLOP/s at a transformer block's shape in fp32 and bf16, and elementwise bandwidth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from orchestrator.engine.device import native_bf16
from orchestrator.inputs.models import TORCH_DTYPES
from orchestrator.pruning.masks import row_mask
from orchestrator.pruning.scores import wanda_score
from orchestrator.shapes import ModelShape
from orchestrator.timing import Accelerator

#: bytes/s a CPU worker moves in a gloo collective (measured here: a 538 MB all-gather of SmolLM2's
#: parameters took 1.05 s between two ranks sharing two cores; docs/benchmarks.md)
CPU_LINK_BW = 0.5e9

#: costs of a CPU worker that no matmul or bandwidth accounts for (DeepSpeed ZeRO-3's per-module hooks and
#: engine start, the block pass's per-block round trip and copies), fitted by least squares to the measured
#: minus the block-measured prediction of the 2026-12-06 scaling runs of 20M-300M parameters (gradient pass:
#: 1 worker; block pass: 1 and 2 workers); held out: the 1B shape, 4 workers and SmolLM2 (docs/benchmarks.md)
CPU_OVERHEADS = {"module_s": 0.61e-3, "startup_s": 1.41, "block_call_s": 0.116, "block_copy_bw": 4.49e8}

#: blocks with more parameters are not timed by :func:`block_efficiency` (a 70B block takes minutes here)
MAX_MEASURED_BLOCK = 400_000_000


def _rate(fn, work: float, repeats: int = 5) -> float:
    """``work`` per second of ``fn`` (the median of ``repeats`` timed calls after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return work / sorted(times)[len(times) // 2]


def _block_seconds(shape: ModelShape, tokens: int, dtype: torch.dtype) -> tuple[float, float]:
    """Median seconds of one seeded random LLaMA block of ``shape``: its forward, and forward plus backward with
    weight gradients (what the gradient pass computes per block: input gradients and per-sample weight
    gradients), on one sequence of ``tokens`` tokens under ``dtype`` autocast."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=1,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                      vocab_size=256, max_position_embeddings=max(tokens, 1), attention_bias=shape.attention_bias,
                      mlp_bias=shape.mlp_bias)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0)
    x = torch.randn(1, tokens, shape.hidden, requires_grad=True)  # (1, T, H)
    positions = torch.arange(tokens)[None]
    rope = LlamaRotaryEmbedding(cfg)(x, positions)
    amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def forward() -> torch.Tensor:
        with amp:
            out = block(x, position_embeddings=rope, position_ids=positions, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward() -> None:
        forward().float().sum().backward()
        block.zero_grad(set_to_none=True)

    def no_grad_forward() -> None:
        with torch.no_grad():
            forward()

    return 1.0 / _rate(no_grad_forward, 1.0, repeats=3), 1.0 / _rate(forward_backward, 1.0, repeats=3)


def block_efficiency(acc: Accelerator, shape: ModelShape, tokens: int, dtype: str) -> tuple[float, float]:
    """``(forward, forward + backward)``: how fast a real block of ``shape`` runs under ``dtype`` against what
    :func:`orchestrator.timing.block_model_seconds` predicts from ``acc``'s matmul rate and bandwidth (1.0: as
    modelled; below: slower; not clipped, so ``efficiency x`` the measured rates is the block's measured speed
    whatever the noise of the matmul measurement). Measured on ``min(tokens, 512)`` tokens; 1.0 for blocks over
    :data:`MAX_MEASURED_BLOCK` parameters (too slow to time here)."""
    from orchestrator.timing import block_model_seconds

    if shape.block_params() > MAX_MEASURED_BLOCK:
        return 1.0, 1.0
    tokens = min(tokens, 512)
    fwd, fwd_bwd = _block_seconds(shape, tokens, TORCH_DTYPES[dtype])
    model_fwd, model_fwd_bwd = block_model_seconds(acc, shape, tokens, dtype)
    return model_fwd / fwd, model_fwd_bwd / fwd_bwd


def measure_cpu(threads: int | None = None, tokens: int = 512, hidden: int = 1024, inter: int = 2816,
                shape: ModelShape | None = None) -> Accelerator:
    """This CPU as an accelerator, with ``threads`` torch threads: matmuls of the run's block shape
    ``(tokens, hidden) @ (hidden, inter)`` (``tokens``: one micro-batch's) in fp32 and bf16, the bandwidth
    of an elementwise add over 64 MiB tensors and of writing 64 MiB just allocated, the scorer (a Wanda score,
    a stable row-wise sort, the mask) on an ``(inter, hidden)`` weight, and with a ``shape`` how fast a real
    block of it runs against the model
    (:func:`block_efficiency`; the CPU's ZeRO-3 overheads are :data:`CPU_OVERHEADS`)."""
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
        fresh = _rate(lambda: torch.ones(1 << 24), (1 << 24) * 4.0)  # 64 MiB: mmapped anew by glibc at every call
        w, norm = torch.randn(inter, hidden, generator=g), torch.rand(hidden, generator=g)
        score = _rate(lambda: row_mask(wanda_score(w, norm), 0.5), float(w.numel()), repeats=3)
        n = threads or before
        acc = Accelerator(f"this CPU, {n} thread{'s' if n > 1 else ''} (measured)", rates[torch.float32],
                          rates[torch.bfloat16], bw, CPU_LINK_BW, score, native_bf16("cpu"), alloc_bw=fresh,
                          **CPU_OVERHEADS)
        if shape is not None:  # bf16 only where it is native (emulated bf16 is not what a run would choose)
            acc = dataclasses.replace(acc, fp32_efficiency=block_efficiency(acc, shape, tokens, "float32"),
                                      bf16_efficiency=block_efficiency(acc, shape, tokens, "bfloat16")
                                      if acc.native_bf16 else (1.0, 1.0))
    finally:
        torch.set_num_threads(before)
    return acc
