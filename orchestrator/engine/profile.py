"""Measure this machine as an :class:`orchestrator.timing.Accelerator` (torch only; a few seconds).

The published profiles describe GPUs; a CPU is measured where it runs, with the threads a worker gets:
matmul FLOP/s at a transformer block's shape in fp32 and bf16, elementwise and fresh-memory bandwidth, a
real block of the model against its model, the run's scorer on that block's linears, the block pass's
statistic fold, and how fast a checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.engine.blocks import block_output, run_block
from orchestrator.engine.device import Placement, native_bf16
from orchestrator.inputs.models import TORCH_DTYPES
from orchestrator.pruning.methods import prune_weight
from orchestrator.pruning.stats import ActivationStats
from orchestrator.shapes import ModelShape
from orchestrator.timing import Accelerator

#: bytes/s a CPU worker moves in a gloo collective (measured here: a 538 MB all-gather of SmolLM2's
#: parameters took 1.05 s between two ranks sharing two cores; docs/benchmarks.md)
CPU_LINK_BW = 0.5e9

#: costs of a CPU worker that no matmul or bandwidth accounts for (DeepSpeed ZeRO-3's per-module hooks and
#: engine start, the block pass's per-block round trip and copies), fitted by least squares to the measured
#: minus the block-measured prediction of the 2026-12-06 scaling runs of 20M-300M parameters (gradient pass and
#: block pass: 1 and 2 workers; ``tests/benchmarks/scaling.py --fit``); held out: the 1B shape, 4 workers and
#: SmolLM2 (docs/benchmarks.md)
CPU_OVERHEADS = {"module_s": 0.69e-3, "startup_s": 1.39, "block_call_s": 0.130, "block_copy_bw": 3.5e9}

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
    """Median seconds of one seeded random LLaMA block of ``shape`` on one sequence of ``tokens`` tokens under
    ``dtype`` autocast, through the functions the passes run: the block pass's forward
    (:func:`~orchestrator.engine.blocks.run_block`), and the gradient pass's forward and backward with weight
    gradients."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=1,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                      vocab_size=256, max_position_embeddings=max(tokens, 1), attention_bias=shape.attention_bias,
                      mlp_bias=shape.mlp_bias)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0)
    x = torch.randn(1, tokens, shape.hidden)  # (1, T, H)
    positions = torch.arange(tokens)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg)(x, positions), "position_ids": positions,
              "attention_mask": None}
    place = Placement(torch.device("cpu"), None if dtype == torch.float32 else dtype)
    x_grad = x.clone().requires_grad_(True)

    def forward() -> None:
        run_block(block, x, kwargs, place)

    def forward_backward() -> None:
        block_output(block, x_grad, kwargs, place).float().sum().backward()
        block.zero_grad(set_to_none=True)

    return 1.0 / _rate(forward, 1.0, repeats=3), 1.0 / _rate(forward_backward, 1.0, repeats=3)


def fold_rate(shape: ModelShape, tokens: int) -> float:
    """Bytes/s of the block pass's statistic fold (:func:`orchestrator.timing.fold_bytes_per_token`): every
    linear of a ``shape`` block folding sequences of ``tokens`` inputs into its ``sum x^2``, each sequence's
    inputs distinct and together at least 64 MiB, so they come from memory as a run's would, not from cache."""
    from orchestrator.timing import fold_bytes_per_token

    g = torch.Generator().manual_seed(0)
    dims = [i for _, i in shape.block_linears().values()]
    copies = max(2, math.ceil((64 << 20) / (tokens * sum(dims) * 4)))
    stats = [ActivationStats(i) for i in dims]
    inputs = [[torch.randn(1, tokens, i, generator=g) for i in dims] for _ in range(copies)]

    def fold() -> None:
        for seq in inputs:
            for st, x in zip(stats, seq, strict=True):
                st.update(x)

    return _rate(fold, float(copies * tokens * fold_bytes_per_token(shape)), repeats=3)


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


def score_rate(shape: ModelShape | None, method: str, hidden: int, inter: int) -> float:
    """Weights/s the block pass's scorer prunes with ``method`` (``magnitude``, ``wanda`` or ``gblm``; others:
    ``wanda``): every linear of a seeded random block of ``shape`` (the real shapes: row lengths set the sort's
    cost), or one ``(inter, hidden)`` weight without a shape or for blocks over :data:`MAX_MEASURED_BLOCK`."""
    method = method if method in ("magnitude", "wanda", "gblm") else "wanda"
    dims = [(inter, hidden)]
    if shape is not None and shape.block_params() <= MAX_MEASURED_BLOCK:
        dims = list(shape.block_linears().values())
    g = torch.Generator().manual_seed(0)
    layers = []
    for out, inp in dims:
        act = ActivationStats(inp)
        act.update(torch.randn(8, inp, generator=g))
        layers.append((torch.randn(out, inp, generator=g), act, torch.rand(out, inp, generator=g)))

    def prune_block() -> None:
        for w, act, grad in layers:
            prune_weight(w, method, 0.5, None, act=act, grad=grad if method == "gblm" else None)

    return _rate(prune_block, float(sum(o * i for o, i in dims)), repeats=3)


def save_rate(directory: Path) -> float:
    """Bytes/s of writing a 64 MiB checkpoint file into ``directory`` as the checkpoints are written (safetensors
    bytes, a synced temp file renamed, its SHA-256); the median of three."""
    import hashlib

    from safetensors.torch import save

    from orchestrator.fileio import atomic_write_bytes

    tensors = {"x": torch.ones(1 << 24)}
    with tempfile.TemporaryDirectory(prefix=".rayprune-save-rate-", dir=directory) as tmp:

        def write() -> None:
            data = save(tensors)
            atomic_write_bytes(Path(tmp) / "probe.safetensors", data)
            hashlib.sha256(data).hexdigest()

        return _rate(write, float(1 << 26), repeats=3)


def measure_cpu(threads: int | None = None, tokens: int = 512, hidden: int = 1024, inter: int = 2816,
                shape: ModelShape | None = None, method: str = "wanda", save_dir: Path | None = None) -> Accelerator:
    """This CPU as an accelerator, with ``threads`` torch threads: matmuls of the run's block shape
    ``(tokens, hidden) @ (hidden, inter)`` (``tokens``: one micro-batch's) in fp32 and bf16, the bandwidth
    of an elementwise add over 64 MiB tensors and of writing 64 MiB just allocated, the scorer of ``method``
    (:func:`score_rate`), and with a ``shape`` how fast a real block of it runs against the model
    (:func:`block_efficiency`) and folds its inputs into statistics, and with a ``save_dir`` how fast checkpoints
    are written there (:func:`save_rate`); the CPU's ZeRO-3 overheads are :data:`CPU_OVERHEADS`."""
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
        n = threads or before
        acc = Accelerator(f"this CPU, {n} thread{'s' if n > 1 else ''} (measured)", rates[torch.float32],
                          rates[torch.bfloat16], bw, CPU_LINK_BW, score_rate(shape, method, hidden, inter),
                          native_bf16("cpu"), alloc_bw=fresh, save_bw=save_rate(save_dir) if save_dir else 0.0,
                          **CPU_OVERHEADS)
        if shape is not None:  # bf16 only where it is native (emulated bf16 is not what a run would choose)
            acc = dataclasses.replace(acc, fp32_efficiency=block_efficiency(acc, shape, tokens, "float32"),
                                      bf16_efficiency=block_efficiency(acc, shape, tokens, "bfloat16")
                                      if acc.native_bf16 else (1.0, 1.0), fold_bw=fold_rate(shape, min(tokens, 512)))
    finally:
        torch.set_num_threads(before)
    return acc
