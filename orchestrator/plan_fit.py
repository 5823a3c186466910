"""Whether a plan fits the workers' devices, and over which link their collectives run.

:func:`orchestrator.planner.plan` counts the tensors a run makes. A real worker needs more than those: on a
GPU, its process's CUDA context and library workspaces, NCCL's communication buffers, and the caching
allocator's fragmentation (blocks reserved but not reusable at the peak); and the model must also get
through loading. :func:`device_need` adds those terms, :func:`verdict` compares them with one worker's
device memory, :func:`eval_workers_needed` and :func:`recovery_workers_needed` how many actors evaluation
and LoRA recovery need, and :func:`link_bw` gives the bandwidth a ring collective of ``W`` ranks sustains over the
cluster's fabric (NVLink within a node, InfiniBand or TCP between nodes). Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.planner import FP32, GIB, ModelShape, Plan

#: one CUDA process's fixed device memory before any tensor: the context, cuBLAS/cuDNN workspaces, the
#: kernels' modules (0.3-0.6 GB on Hopper with torch 2.x; the larger figure)
CUDA_CONTEXT_BYTES = 512 * 2**20
#: NCCL's buffers of one rank in one communicator: 4 MiB per channel and direction (NCCL_BUFFSIZE) over up to
#: 32 channels, plus its proxy and work FIFOs (DeepSpeed's process group and the statistics' one)
NCCL_BYTES = 2 * 32 * 4 * 2**20 + 64 * 2**20
#: the caching allocator's fragmentation: reserved beyond the allocated peak, as a fraction of that peak
FRAGMENTATION = 0.10

#: parameters of the builtin SmolLM2-135M (tied embeddings counted once)
SMOLLM2_PARAMS = 134_515_008

#: sustained fraction of a link's published bandwidth in a ring collective
LINK_EFFICIENCY = 0.7
#: published bandwidths (bytes/s, one direction) of the fabrics ranks talk over, and whether the node's GPUs
#: share it (one NIC per node) or each has its own (one InfiniBand NIC per GPU, as in DGX/HGX H100 nodes)
LINKS: dict[str, tuple[str, float, bool]] = {
    "nvlink": ("NVLink 4 (within a node)", 450e9, False),
    "infiniband": ("InfiniBand NDR, 400 Gb/s per GPU", 50e9, False),
    "tcp": ("TCP, 100 GbE per node shared by its ranks", 12.5e9, True),
}


@dataclass(frozen=True)
class Need:
    """What one worker's device must hold.

    Attributes:
        peak_bytes: the plan's allocator peak (:attr:`Plan.peak_bytes`, or its loading peak if larger).
        fragmentation_bytes: the allocator's reserve beyond that peak (GPU only).
        fixed_bytes: the CUDA context and NCCL buffers (GPU only).
        total_bytes: their sum.
    """

    peak_bytes: int
    fragmentation_bytes: int
    fixed_bytes: int

    @property
    def total_bytes(self) -> int:  # noqa: D102
        return self.peak_bytes + self.fragmentation_bytes + self.fixed_bytes


def device_need(p: Plan, gpu: bool) -> Need:
    """The device memory one worker of plan ``p`` needs (``gpu``: the fixed and fragmentation terms apply)."""
    peak = max(p.peak_bytes, p.load_bytes)
    if not gpu:  # a CPU worker's allocator returns big blocks to the kernel; its peak was measured as is
        return Need(peak, 0, 0)
    fixed = CUDA_CONTEXT_BYTES + (NCCL_BYTES if p.workers > 1 else 0)
    return Need(peak, round(peak * FRAGMENTATION), fixed)


def verdict(p: Plan, budget_bytes: int, gpu: bool, device: str = "GPU") -> str | None:
    """None when plan ``p`` fits ``budget_bytes`` per worker, else one line saying by how much and what would help."""
    need = device_need(p, gpu)
    if need.total_bytes <= budget_bytes:
        return None
    parts = f"peak {_g(need.peak_bytes)}"
    if gpu:
        parts += f" + fragmentation {_g(need.fragmentation_bytes)} + CUDA context and NCCL {_g(need.fixed_bytes)}"
    hints = []
    if p.param_bytes * p.workers >= p.total_params * 4:  # fp32 parameters
        hints.append("model.dtype=bfloat16")
    hints += ["more backend.workers", "backend.offload_stats=true" if p.grad_stat_bytes and not p.offload_stats
              else "", "backend.activation_checkpointing=true" if p.grad_pass_bytes and not p.activation_checkpointing
              else ""]
    return (f"the plan needs {_g(need.total_bytes)} per worker ({parts}) but each worker's {device} has "
            f"{_g(budget_bytes)}; try {', '.join(h for h in hints if h)} (`rayprune plan` shows every term)")


def link_bw(intra_bw: float, link: str, workers: int, per_node: int) -> tuple[float, str]:
    """Bytes/s a ring collective of ``workers`` ranks sustains per rank, and what limits it.

    Within one node the ranks ring over ``intra_bw`` (the accelerator's NVLink); across nodes the slowest hop,
    the inter-node ``link``, sets the ring's pace. A ``tcp`` link with one GPU per pod (``per_node`` 1) limits
    every hop.

    Raises:
        ValueError: unknown ``link`` or a non-positive ``per_node``.
    """
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; expected one of {', '.join(LINKS)}")
    if per_node < 1:
        raise ValueError(f"ranks per node must be >= 1, got {per_node}")
    nodes = -(-workers // per_node)
    if nodes == 1:
        return intra_bw, f"{workers} rank(s) on one node"
    label, bw, shared = LINKS[link]
    per_rank = bw * LINK_EFFICIENCY / (min(per_node, workers) if shared else 1)
    return min(intra_bw, per_rank), f"{workers} ranks on {nodes} nodes over {label}"


def format_need(p: Plan, budget_bytes: int, gpu: bool) -> str:
    """The plan's device-fit lines: the added terms, the total, and the verdict."""
    need = device_need(p, gpu)
    lines = [f"device need per worker: {_g(need.total_bytes)} (allocator peak {_g(need.peak_bytes)}"
             + (f", fragmentation {FRAGMENTATION:.0%} {_g(need.fragmentation_bytes)}, CUDA context "
                f"{_g(CUDA_CONTEXT_BYTES)}, NCCL {_g(need.fixed_bytes - CUDA_CONTEXT_BYTES)}" if gpu else "") + ")"]
    refusal = verdict(p, budget_bytes, gpu)
    lines.append(f"verdict: fits {_g(budget_bytes)} per worker" if refusal is None else f"verdict: refused: {refusal}")
    return "\n".join(lines)


def eval_bytes(model_config: Any, *, seq_len: int, dtype_bytes: int = 2, workers: int = 1) -> int:
    """Device memory of one evaluation actor scoring one window of ``seq_len`` tokens.

    Its parameters (all of them, or with ``eval.shard`` its ``1/W`` partition plus two gathered blocks),
    one block's activations (inference keeps none across blocks) and the window's logits (model dtype and
    an fp32 copy for the loss).
    """
    s = ModelShape.from_config(model_config)
    params = math.ceil(s.total_params() * dtype_bytes / workers) + (2 * s.block_params() * dtype_bytes
                                                                    if workers > 1 else 0)
    return params + seq_len * s.activations_per_token() * dtype_bytes + seq_len * s.vocab * (dtype_bytes + FP32)


def eval_workers_needed(model_config: Any, gpu_bytes: int, *, seq_len: int, dtype_bytes: int = 2,
                        headroom: float = 0.1, max_workers: int = 64) -> int:
    """Evaluation actors one model needs: 1 where it fits one device, else the fewest sharing it (``eval.shard``).

    Raises:
        ValueError: not even ``max_workers`` actors hold it.
    """
    for w in range(1, max_workers + 1):
        if eval_bytes(model_config, seq_len=seq_len, dtype_bytes=dtype_bytes, workers=w) <= gpu_bytes * (1 - headroom):
            return w
    raise ValueError(f"no evaluation group up to {max_workers} actors holds the model in {gpu_bytes / GIB:.2f} GiB")


def recovery_bytes(model_config: Any, *, removed: float, rank: int, seq_len: int, dtype_bytes: int = 2,
                   workers: int = 1) -> int:
    """Device memory of one LoRA recovery rank after SAAP removed ``removed`` of the decoder's linear weights.

    The shrunk model's parameters (all of them; with ``structured.recovery.zero3`` its ``1/W`` partition plus
    two gathered blocks), the adapters (rank ``rank`` on the seven projections of every block) with their
    gradients and Adam's two moments in fp32 (``1/W`` under ZeRO-3), one window's activations kept for the
    backward and its logits (model dtype, an fp32 copy and its gradient). Adapters and activations are
    counted at the dense widths: an upper bound.
    """
    s = ModelShape.from_config(model_config)
    if not 0 <= removed < 1:
        raise ValueError(f"removed must be in [0, 1), got {removed!r}")
    params = s.total_params() - round(removed * s.layers * s.block_linear_params())
    adapters = s.layers * sum(rank * (o + i) for o, i in s.block_linears().values())
    sharded = math.ceil(params * dtype_bytes / workers) + (2 * s.block_params() * dtype_bytes if workers > 1 else 0)
    window = s.backward_bytes(seq_len, dtype_bytes, checkpoint=False) + seq_len * s.vocab * (dtype_bytes + 2 * FP32)
    return sharded + math.ceil(4 * adapters * FP32 / workers) + window


def recovery_workers_needed(model_config: Any, gpu_bytes: int, *, headroom: float = 0.1, max_workers: int = 64,
                            **kw: Any) -> int:
    """Recovery ranks the shrunk model needs: 1 where it fits one device, else the fewest under ZeRO-3.

    Args:
        model_config: as for :func:`plan`.
        gpu_bytes: memory of one device.
        headroom: fraction of ``gpu_bytes`` left free.
        max_workers: search limit.
        **kw: :func:`recovery_bytes`'s keyword arguments (``removed``, ``rank``, ``seq_len``, ``dtype_bytes``).

    Raises:
        ValueError: not even ``max_workers`` ranks hold it.
    """
    for w in range(1, max_workers + 1):
        if recovery_bytes(model_config, workers=w, **kw) <= gpu_bytes * (1 - headroom):
            return w
    raise ValueError(f"no recovery group up to {max_workers} ranks holds the shrunk model in {gpu_bytes / GIB:.2f} GiB")


def coordinator_need(cfg: Any) -> int:
    """Host bytes a run's coordinator process needs, for a scheduler to reserve (0: not known without the model).

    A distributed run's coordinator holds no model: the planner's base plus the calibration windows. A
    one-process run holds the model (fp32) about three times over (loaded, pruned in place with its statistics,
    saved), known here for the builtin and ``tiny`` models.
    """
    from orchestrator.planner import COORDINATOR_BASE_BYTES

    c = cfg.calibration
    windows = 3 * c.num_samples * c.seq_len * 8  # ids, Arrow shards, the list they came from
    if cfg.backend.kind == "ray" and not cfg.structured.enabled:
        return COORDINATOR_BASE_BYTES + windows
    params = known_params(cfg)
    if not params:
        return 0
    return COORDINATOR_BASE_BYTES + windows + 3 * params * FP32


def known_params(cfg: Any) -> int:
    """The model's parameter count where it is known before loading (the builtin and ``tiny`` models), else 0."""
    if cfg.model.source == "tiny":
        from orchestrator.inputs.models import tiny_params

        return tiny_params(cfg.model.tiny)
    return SMOLLM2_PARAMS if cfg.model.source == "smollm2-135m" else 0


def _g(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
