"""Memory and communication planner: reads a model's config only, never its weights.

Predicts, per worker, what a run needs under ZeRO-3 sharding (parameters and
gradient statistics partitioned over ``W`` workers, calibration sequences split
over workers) and how many workers a GPU size requires. Pure Python: no torch,
no Ray, no DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.shapes import FP32, LLAMA2_13B, LLAMA2_70B, LLAMA3_70B, SHAPES, ModelShape, element_bytes

__all__ = ["FP32", "GIB", "LLAMA2_13B", "LLAMA2_70B", "LLAMA3_70B", "SHAPES", "ModelShape", "Plan", "plan",
           "min_workers", "needs_checkpointing", "choose_checkpointing", "run_plan_kwargs", "format_plan",
           "grad_kinds_for", "zero3_limits"]

#: logits elements of one chunk of the gradient pass's loss (``orchestrator.pruning.lmloss.CHUNK_ELEMENTS``;
#: repeated here so planning never imports torch)
LOSS_CHUNK_ELEMENTS = 1 << 23

#: per-sample statistics of this many linears may wait for their reduce-scatter at once
#: (``actors.zero3.ShardedGradStats``' ``max_pending``): two overlap the backward of the next linear
FOLD_PENDING = 2

#: ZeRO-3 keeps at most this many gathered parameter elements live beyond the module it runs, and prefetches
#: up to this many more (the engines' ``stage3_max_live_parameters`` / ``stage3_prefetch_bucket_size``,
#: ``actors.loading.ds_config``)
ZERO3_MAX_LIVE_PARAMETERS = 10_000_000
ZERO3_PREFETCH_BUCKET = 5_000_000

#: bytes per weight the scorer holds for the linear it scores: the fp32 score, a row-wise sort's fp32 values
#: and int64 indices, the bool mask
SCORE_BYTES_PER_WEIGHT = FP32 + FP32 + 8 + 1

#: ``(in, in)`` fp32 matrices SparseGPT holds beside the statistics' ``xtx`` while it factors its widest linear
#: (``pruning.sparsegpt``): the scaled Hessian, its damped copy and one Cholesky factor (3 x 3.3 GB for a 70B
#: ``down_proj``)
SPARSEGPT_H_COPIES = 3
#: the ADMM support search (``pruning.search: admm``) of the widest linear: fp64 ``H`` (normalised in place), its
#: eigenvectors and the eigensolver's workspace, the fp32 inverse; and ``(out, in)`` fp32 iterates of the largest
ADMM_IN_IN_BYTES = 3 * 8 + FP32
ADMM_OUT_IN_COPIES = 9

#: the coordinator's resident memory apart from its windows: Python, torch, transformers, the Ray driver, the
#: tokenizer and the model's meta-device skeleton; independent of the model's size (it holds no weight).
#: Measured: the driver's peak RSS on the seeded 236M and 756M shapes with 1, 2 and 4 workers
#: (tests/benchmarks/data_plane.py, docs/benchmarks.md), rounded up.
COORDINATOR_BASE_BYTES = 1_200_000_000

GIB = 1024**3
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm", "gblm-sparsegpt", "saap")  # saap: structured.enabled


def grad_kinds_for(method: str, norm: str = "l1", second_order: bool = False) -> tuple[str, ...]:
    """Gradient statistics ``method`` keeps: GBLM ``abs`` (l1) or ``sq`` (l2), SAAP ``sum`` (and ``sq`` for
    the ``second_order`` estimator ``element2``), else none.

    Mirrors ``pruning.methods.gradient_kinds`` (and SAAP's ``structured.run.statistic_kinds``) without
    importing torch.

    Raises:
        ValueError: unknown method or norm.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if method in ("gblm", "gblm-sparsegpt"):
        return ("abs",) if norm == "l1" else ("sq",)
    if method == "saap":
        return ("sum", "sq") if second_order else ("sum",)
    return ()


@dataclass
class Plan:
    """Per-worker memory (bytes) and communication volume (bytes) of one run.

    Attributes:
        workers: number of workers ``W``.
        method: pruning method.
        grad_kinds: gradient statistics kept (``abs``/``sq``), empty if none.
        total_params: parameters of the whole model.
        param_bytes: this worker's parameter shard, ``params * dtype_bytes / W``.
        grad_stat_bytes: per kind, this worker's fp32 shard of decoder linear weights.
        calib_bytes: calibration hidden states held, ``ceil(N/W) * L * hidden * 4 * 2``.
        largest_block_bytes: one gathered block in fp32 plus its gathered gradient
            statistics plus (SparseGPT) its ``xtx`` matrices, plus the scorer's transients for its
            largest linear (:data:`SCORE_BYTES_PER_WEIGHT`), plus SparseGPT's factorisation copies of its
            widest linear's Hessian (:data:`SPARSEGPT_H_COPIES`).
        grad_pass_bytes: gradient-pass transient: the parameters ZeRO-3 holds gathered (``W > 1``:
            the module it runs, up to :data:`ZERO3_MAX_LIVE_PARAMETERS` live and
            :data:`ZERO3_PREFETCH_BUCKET` prefetched, at most two blocks; one rank keeps its parameters
            whole and gathers nothing), one micro-batch's activations kept for the backward
            (:meth:`ModelShape.activations_per_token` in every block, or with activation
            checkpointing every block's input plus one block's activations), its fp32
            final-hidden gradient, the loss's logits chunk (no full logits are built), and the
            per-sample statistic fold (:attr:`fold_bytes`); 0 for gradient-free methods.
        fold_bytes: the part of ``grad_pass_bytes`` the per-sample statistics take: one linear's
            per-sample products of a micro-batch and its statistics, and (``W > 1``) the full fp32
            statistics of the :data:`FOLD_PENDING` largest consecutive linears waiting for their
            reduce-scatter (twice with ``host_collectives``: gloo reduce-scatters a copy).
        activation_checkpointing: whether ``grad_pass_bytes`` assumes recomputed block activations.
        offload_stats: the gradient-statistic partitions live in (pinned) host memory, not on the
            accelerator: they count in :attr:`host_bytes`, not in :attr:`peak_bytes`.
        peak_bytes: accelerator memory, ``param + grad stats (unless offloaded) + max(grad_pass,
            calib + largest_block)``.
        host_bytes: host memory of the offloaded statistic partitions (0 without offload).
        comm_per_seq_bytes: gradient pass, per calibration sequence and worker: two
            parameter all-gathers (forward and backward; three with activation checkpointing,
            whose recomputed forward gathers again) and one fp32 reduce-scatter per
            gradient statistic per micro-batch of ``grad_batch`` sequences, each with the
            ring factor ``(W-1)/W``; 0 for gradient-free methods.
        comm_block_pass_bytes: block-sequential pass, whole run: one all-gather of
            every block and the all-reduce of each block's activation statistics.
        load_bytes: a worker's loading peak: its parameter shard, the largest module built whole before
            ``zero.Init`` partitions it (the embedding or head at 70B), and its slice of the largest tensor as
            read from the checkpoint (its rows, then converted).
        coordinator_bytes: the coordinator's host memory: :data:`COORDINATOR_BASE_BYTES` plus the calibration
            windows (token ids, their per-worker Arrow shards); it holds no weight, so it does not grow with
            the model or the workers.
    """

    workers: int
    method: str
    grad_kinds: tuple[str, ...]
    total_params: int
    param_bytes: int
    grad_stat_bytes: dict[str, int]
    calib_bytes: int
    largest_block_bytes: int
    grad_pass_bytes: int
    comm_per_seq_bytes: int
    comm_block_pass_bytes: int
    fold_bytes: int = 0
    load_bytes: int = 0
    coordinator_bytes: int = 0
    activation_checkpointing: bool = False
    offload_stats: bool = False
    peak_bytes: int = field(init=False)
    host_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        transient = max(self.grad_pass_bytes, self.calib_bytes + self.largest_block_bytes)
        stats = sum(self.grad_stat_bytes.values())
        self.host_bytes = stats if self.offload_stats else 0
        self.peak_bytes = self.param_bytes + stats - self.host_bytes + transient

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) of every field."""
        d = asdict(self)
        d["grad_kinds"] = list(self.grad_kinds)
        return d


def plan(
    model_config: Any, *, workers: int, method: str, norm: str = "l1", num_samples: int, seq_len: int,
    dtype_bytes: int = 2, grad_batch: int = 4, reconstruct: str = "none", checkpoint: bool = False,
    offload_stats: bool = False, second_order: bool = False, host_collectives: bool = False,
    compute_bytes: int | None = None, search: str = "none",
) -> Plan:
    """Predict per-worker memory and communication for one run.

    Args:
        model_config: a ``PretrainedConfig``-like object or dict (see :meth:`ModelShape.from_config`).
        workers: number of workers ``W`` (ZeRO-3 shards over all of them).
        method: ``magnitude``, ``wanda``, ``sparsegpt``, ``gblm`` or ``gblm-sparsegpt``.
        norm: GBLM's gradient norm (``l1`` keeps ``grad_abs``, ``l2`` keeps ``grad_sq``).
        num_samples: calibration sequences ``N``.
        seq_len: tokens per sequence ``L``.
        dtype_bytes: bytes per parameter of the model dtype (2 for bf16/fp16).
        grad_batch: sequences per forward/backward of the gradient pass
            (``backend.grad_batch_size``): one parameter gather and one statistic
            reduce-scatter serve all of them.
        reconstruct: ``pruning.reconstruct``; anything but ``none`` keeps ``sum x x^T`` like SparseGPT,
            and ``block`` adds the block tuning's optimiser state and one sequence's backward.
        search: ``pruning.search``; ``admm`` adds the search's eigendecomposition and iterates.
        checkpoint: the gradient pass recomputes each block's activations in the backward
            (``backend.activation_checkpointing``).
        offload_stats: the statistic partitions are kept in host memory (``backend.offload_stats``).
        second_order: SAAP with the ``element2`` estimator (it also keeps ``grad_sq``).
        host_collectives: the workers are CPU processes on gloo, whose reduce-scatter works on a copy of
            its input (NCCL's does not).
        compute_bytes: bytes per element of the gradient pass's autocast dtype (None: the model's): an fp32
            model under bf16 autocast keeps most activations in bf16.

    ``method="saap"`` plans structured pruning on the workers: the gradient pass keeps each statistic
    twice (the current mini-batch's and the total) and there is no block pass (the coordinator shrinks).

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: non-positive sizes, unknown method or norm, bad model config.
    """
    sizes = {"workers": workers, "num_samples": num_samples, "seq_len": seq_len, "dtype_bytes": dtype_bytes,
             "grad_batch": grad_batch}
    for name, val in sizes.items():
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    kinds = grad_kinds_for(method, norm, second_order)
    saap = method == "saap"
    xtx = method in ("sparsegpt", "gblm-sparsegpt") or reconstruct != "none"
    s = ModelShape.from_config(model_config)
    w, total, block, block_lin = workers, s.total_params(), s.block_params(), s.block_linear_params()
    linear_params = s.layers * block_lin
    ring = (w - 1) / w  # ring all-gather / reduce-scatter: each worker moves (W-1)/W of the tensor
    held = [*kinds, *(f"{k}_total" for k in kinds)] if saap else kinds  # SAAP: the mini-batch's and the total
    stats = {k: math.ceil(linear_params * FP32 / w) for k in held}
    calib = 0 if saap else math.ceil(num_samples / w) * seq_len * s.hidden * FP32 * 2
    largest = 0 if saap else (block * FP32 + len(kinds) * block_lin * FP32 + (s.xtx_bytes() if xtx else 0)
                              + s.largest_linear() * SCORE_BYTES_PER_WEIGHT)
    if method in ("sparsegpt", "gblm-sparsegpt"):  # H, its damped copy and a Cholesky factor beside xtx at once
        largest += SPARSEGPT_H_COPIES * max(i for _, i in s.block_linears().values()) ** 2 * FP32
    if search == "admm":
        largest += (ADMM_IN_IN_BYTES * max(i for _, i in s.block_linears().values()) ** 2
                    + ADMM_OUT_IN_COPIES * s.largest_linear() * FP32)
    if reconstruct == "block":  # Adam's two moments and the gradient of the kept weights, one sequence's backward
        largest += 3 * block_lin * FP32 + seq_len * s.activations_per_token() * FP32
    grad_pass = comm_seq = fold = 0
    if kinds:
        # the activations kept for the backward, the fp32 gradient w.r.t. the final hidden states, the loss's chunk
        acts = (s.backward_bytes(grad_batch * seq_len, dtype_bytes, checkpoint, compute_bytes)
                + LOSS_CHUNK_ELEMENTS * FP32)
        # one linear's (B, out, in) per-sample products (in a 16-bit compute dtype, then fp32) and its
        # statistics, plus the full fp32 statistics in flight to their reduce-scatter
        narrow = compute_bytes or dtype_bytes
        product = FP32 + (narrow if narrow < FP32 else 0)
        in_flight = s.consecutive_linears(FOLD_PENDING) * FP32 * (2 if host_collectives else 1) if w > 1 else 0
        fold = s.largest_linear() * (grad_batch * product + len(kinds) * FP32) + in_flight
        steps = math.ceil(math.ceil(num_samples / w) / grad_batch)  # forward/backward micro-batches per rank
        grad_pass = gathered_bytes(s, w, dtype_bytes, steps) + acts + fold
        gathers = 3 if checkpoint else 2  # forward and backward; a recomputed forward gathers each block again
        comm_seq = round(ring * (gathers * total * dtype_bytes + len(kinds) * linear_params * FP32) / grad_batch)
    act_stats = sum(FP32 * i + (2 * FP32 * i * i if xtx else 0) for _, i in s.block_linears().values())  # fp64 xtx
    act_allreduce = 2 * ring * act_stats * s.layers if method not in ("magnitude", "saap") or xtx else 0
    biggest = max(s.largest_linear(), s.vocab * s.hidden)  # the largest tensor: a linear, the embedding or head
    load = math.ceil(total * dtype_bytes / w) + biggest * dtype_bytes + math.ceil(biggest / w) * (dtype_bytes + FP32)
    coordinator = COORDINATOR_BASE_BYTES + 3 * num_samples * seq_len * 8  # ids, Arrow shards, the list they came from
    return Plan(
        workers=w, method=method, grad_kinds=kinds, total_params=total, load_bytes=load,
        coordinator_bytes=coordinator,
        param_bytes=math.ceil(total * dtype_bytes / w), grad_stat_bytes=stats, calib_bytes=calib,
        largest_block_bytes=largest, grad_pass_bytes=grad_pass, comm_per_seq_bytes=comm_seq,
        comm_block_pass_bytes=0 if saap else round(ring * total * dtype_bytes + act_allreduce), fold_bytes=fold,
        activation_checkpointing=checkpoint and bool(kinds), offload_stats=offload_stats and bool(kinds),
    )


def zero3_limits(s: ModelShape | None, dtype_bytes: int = 2, budget_bytes: int | None = None) -> tuple[int, int]:
    """ZeRO-3's ``(stage3_max_live_parameters, stage3_prefetch_bucket_size)`` for a model, in elements.

    The fixed defaults (:data:`ZERO3_MAX_LIVE_PARAMETERS`, :data:`ZERO3_PREFETCH_BUCKET`) are smaller than one
    linear of a large model (Llama-3-70B's are 67-235M elements), which turns prefetching off and exposes every
    gather. Here the live limit holds two of the largest linears and the prefetch bucket one, so the next
    module's gather overlaps the current one's compute; where ``budget_bytes`` (a worker's device memory) would
    spend more than a tenth of itself on them, one linear live and no more prefetch than the defaults.

    Args:
        s: the model's shape (None: not a LLaMA-like config; the defaults).
        dtype_bytes: bytes per parameter element.
        budget_bytes: the worker's device memory, or None.
    """
    if s is None:
        return ZERO3_MAX_LIVE_PARAMETERS, ZERO3_PREFETCH_BUCKET
    largest = s.largest_linear()
    live, prefetch = max(ZERO3_MAX_LIVE_PARAMETERS, 2 * largest), max(ZERO3_PREFETCH_BUCKET, largest)
    if budget_bytes is not None and (live + prefetch) * dtype_bytes > budget_bytes // 10:
        live, prefetch = max(ZERO3_MAX_LIVE_PARAMETERS, largest), ZERO3_PREFETCH_BUCKET
    return live, prefetch


def gathered_bytes(s: ModelShape, workers: int, dtype_bytes: int, steps: int = 2) -> int:
    """Parameters ZeRO-3 holds gathered at once in a forward or backward: the module it runs (a block linear,
    or the embedding or head) plus its live and prefetch limits, at most two blocks; none on one rank.

    ZeRO-3 records the module order during its first forward/backward and prefetches from the second on, so a
    pass of one micro-batch per rank (``steps``) gathers only the module it runs."""
    if workers == 1:
        return 0
    largest = max(s.largest_linear(), s.vocab * s.hidden)
    if steps <= 1:
        return largest * dtype_bytes
    live, prefetch = zero3_limits(s, dtype_bytes)
    return min(2 * s.block_params(), largest + live + prefetch) * dtype_bytes


def run_plan_kwargs(cfg: Any, workers: int | None = None, native_bf16: bool | None = None) -> dict[str, Any]:
    """:func:`plan`'s keyword arguments for a run config (a ``RunConfig``; read, not imported).

    ``native_bf16``: whether the workers compute bf16 natively, which resolves an ``auto`` gradient-pass dtype
    (None: unknown, and ``auto`` is planned in the model dtype).
    """
    from orchestrator.inputs.config import resolve_compute_dtype

    pr, b, st = cfg.pruning, cfg.backend, cfg.structured
    grad_dtype = pr.gblm.grad_dtype if native_bf16 is None else resolve_compute_dtype(pr.gblm.grad_dtype, native_bf16)
    compute = None if grad_dtype == "auto" else element_bytes(grad_dtype)
    return dict(workers=workers or b.workers, method="saap" if st.enabled else pr.method, norm=pr.gblm.norm,
                num_samples=cfg.calibration.num_samples, seq_len=cfg.calibration.seq_len,
                dtype_bytes=element_bytes(cfg.model.dtype), grad_batch=b.grad_batch_size,
                reconstruct=pr.reconstruct, search=pr.search, offload_stats=b.offload_stats,
                second_order="element2" in st.estimators, compute_bytes=compute)


def choose_checkpointing(cfg: Any, model_config: Any, workers: int, budget_bytes: int) -> bool:
    """``backend.activation_checkpointing`` of a run, or where it is null, :func:`needs_checkpointing`'s answer.

    Args:
        cfg: the run config.
        model_config: the model's config (a model whose config the planner cannot read runs without).
        workers: the workers the statistics are sharded over.
        budget_bytes: the smallest worker device's memory.
    """
    if cfg.backend.activation_checkpointing is not None:
        return bool(cfg.backend.activation_checkpointing)
    try:
        return needs_checkpointing(model_config, budget_bytes, **run_plan_kwargs(cfg, workers))
    except ValueError:  # not a LLaMA-like config: nothing to predict from
        return False


def needs_checkpointing(model_config: Any, budget_bytes: int, *, headroom: float = 0.1, **kw: Any) -> bool:
    """Whether the gradient pass must recompute block activations for the plan to fit ``budget_bytes``.

    ``backend.activation_checkpointing: null`` asks this with each worker's device memory: on when
    the plan without checkpointing leaves less than ``headroom`` of it free.

    Args:
        model_config: as for :func:`plan`.
        budget_bytes: memory of one worker's device (GPU memory, or host memory per CPU worker).
        headroom: fraction of ``budget_bytes`` left free.
        **kw: :func:`plan`'s keyword arguments (``workers``, ``method``, ...), without ``checkpoint``.
    """
    return plan(model_config, checkpoint=False, **kw).peak_bytes > budget_bytes * (1 - headroom)


def min_workers(
    model_config: Any, gpu_bytes: int, *, safety_factor: float = 1.2, method: str = "gblm", norm: str = "l1",
    num_samples: int = 128, seq_len: int = 2048, dtype_bytes: int = 2, grad_batch: int = 4, max_workers: int = 4096,
    reconstruct: str = "none", checkpoint: bool = False, offload_stats: bool = False, second_order: bool = False,
    compute_bytes: int | None = None, need: Callable[[Plan], int] | None = None, search: str = "none",
) -> int:
    """Smallest ``W`` whose predicted peak, times ``safety_factor``, fits in ``gpu_bytes``.

    Args:
        model_config: as for :func:`plan` (so are ``method``, ``norm``, ``num_samples``,
            ``seq_len``, ``dtype_bytes``, ``grad_batch``, ``reconstruct``, ``checkpoint``, ``offload_stats``,
            ``second_order``, ``compute_bytes`` and ``search``).
        gpu_bytes: memory of one GPU in bytes.
        safety_factor: multiplier (>= 1) on the predicted peak to leave headroom.
        max_workers: search limit.
        need: bytes a worker's device must hold for a plan (default: its peak); e.g.
            ``plan_fit.device_need(p, gpu=True).total_bytes`` to count a GPU process's fixed terms.

    Returns:
        The minimum number of workers.

    Raises:
        ValueError: ``safety_factor < 1``, or no ``W <= max_workers`` fits (the
            per-block terms do not shrink with ``W``).
    """
    if safety_factor < 1:
        raise ValueError(f"safety_factor must be >= 1, got {safety_factor!r}")

    def fits(w: int) -> bool:
        p = plan(model_config, workers=w, method=method, norm=norm, num_samples=num_samples,
                 seq_len=seq_len, dtype_bytes=dtype_bytes, grad_batch=grad_batch, reconstruct=reconstruct,
                 checkpoint=checkpoint, offload_stats=offload_stats, second_order=second_order,
                 compute_bytes=compute_bytes, search=search)
        return (p.peak_bytes if need is None else need(p)) * safety_factor <= gpu_bytes

    if not fits(max_workers):
        raise ValueError(
            f"no worker count up to {max_workers} fits {gpu_bytes / GIB:.2f} GiB per GPU "
            f"(safety factor {safety_factor})"
        )
    lo, hi = 1, max_workers  # peak is non-increasing in W: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def format_plan(p: Plan) -> str:
    """A readable two-column table of plan ``p``, sizes in GiB with 2 decimals."""
    kinds = ", ".join(p.grad_kinds) or "none"
    rows = [("method", p.method), ("workers", str(p.workers)), ("parameters", f"{p.total_params / 1e9:.2f} B"),
            ("gradient statistics", kinds), ("activation checkpointing", "on" if p.activation_checkpointing else "off"),
            ("param shard", _gib(p.param_bytes))]
    where = " (host)" if p.offload_stats else ""
    rows += [(f"grad_{k} shard{where}", _gib(v)) for k, v in p.grad_stat_bytes.items()]
    rows += [
        (label, _gib(getattr(p, attr)))
        for label, attr in (
            ("calibration states", "calib_bytes"), ("largest gathered block", "largest_block_bytes"),
            ("gradient pass transient", "grad_pass_bytes"), ("  of which statistic fold", "fold_bytes"),
            ("peak per worker", "peak_bytes"), ("loading peak per worker", "load_bytes"),
            ("coordinator, host RAM", "coordinator_bytes"),
            ("comm per sequence", "comm_per_seq_bytes"), ("comm block pass", "comm_block_pass_bytes"),
        )
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'item':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
