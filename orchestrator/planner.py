"""Memory and communication planner: reads a model's config only, never its weights.

Predicts, per worker, what a run needs under ZeRO-3 sharding (parameters and
gradient statistics partitioned over ``W`` workers, calibration sequences split
over workers) and how many workers a GPU size requires. Pure Python: no torch,
no Ray, no DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: logits elements of one chunk of the gradient pass's loss (``orchestrator.pruning.lmloss.CHUNK_ELEMENTS``;
#: repeated here so planning never imports torch)
LOSS_CHUNK_ELEMENTS = 1 << 23

#: per-sample statistics of this many linears may wait for their reduce-scatter at once
#: (``actors.zero3.ShardedGradStats``' ``max_pending``; repeated here for the same reason)
FOLD_PENDING = 8

GIB = 1024**3
FP32 = 4
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm", "gblm-sparsegpt", "saap")  # saap: structured.enabled

LLAMA2_13B: dict[str, Any] = {
    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
    "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False,
}  # published Llama-2-13B config
LLAMA2_70B: dict[str, Any] = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
}  # published Llama-2-70B config
LLAMA3_70B: dict[str, Any] = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}  # published Llama-3-70B (and 3.1-70B) config
#: ``rayprune plan --shape NAME``
SHAPES: dict[str, dict[str, Any]] = {"llama2-13b": LLAMA2_13B, "llama2-70b": LLAMA2_70B, "llama3-70b": LLAMA3_70B}


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


@dataclass(frozen=True)
class ModelShape:
    """The parts of a LLaMA-style config the planner needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """Read a ``PretrainedConfig``-like object or a dict.

        Args:
            cfg: has ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
                ``num_attention_heads``, ``vocab_size``; optional ``num_key_value_heads``
                (default: heads), ``head_dim`` (default: hidden / heads),
                ``tie_word_embeddings`` (default False), ``attention_bias``, ``mlp_bias``.

        Raises:
            ValueError: a required field is missing or not a positive integer.
        """

        def get(name: str, default: Any = None) -> Any:
            val = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
            return default if val is None else val

        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [n for n in required if get(n) is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        shape = cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", heads)),
            vocab=int(get("vocab_size")),
            head_dim=int(get("head_dim", hidden // heads if heads else 0)),
            tied=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
        )
        bad = [k for k, v in asdict(shape).items() if isinstance(v, int) and not isinstance(v, bool) and v <= 0]
        if bad:
            raise ValueError(f"model config fields must be > 0: {', '.join(bad)}")
        return shape

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """``name -> (out, in)`` of the pruned linears of one decoder block."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }

    def block_linear_params(self) -> int:
        """Weights (no biases) of one block's linears: what gradient statistics cover."""
        return sum(o * i for o, i in self.block_linears().values())

    def block_params(self) -> int:
        """All parameters of one decoder block (linears, biases, two RMSNorms)."""
        outs = {n: o for n, (o, _) in self.block_linears().items()}
        bias = self.attention_bias * sum(outs[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        bias += self.mlp_bias * sum(outs[n] for n in ("gate_proj", "up_proj", "down_proj"))
        return self.block_linear_params() + bias + 2 * self.hidden

    def total_params(self) -> int:
        """Parameter count exactly as ``LlamaForCausalLM(cfg).parameters()``."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.block_params() + self.hidden + embed + head

    def activations_per_token(self) -> int:
        """Values autograd keeps per token of one block for its backward (SDPA/flash attention, no ``T x T``).

        Counted from what a LLaMA block saves: its input, the two RMSNorms' normalised inputs and
        outputs, the attention input, ``q`` and ``k`` after RoPE, ``v``, the attention output and its
        log-sum-exp, the residual, and four ``intermediate``-wide MLP tensors (gate, SiLU, up, product).
        """
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 6 * self.hidden + 2 * q + 2 * kv + self.heads + 4 * self.intermediate + 2

    def backward_bytes(self, tokens: int, dtype_bytes: int, checkpoint: bool) -> int:
        """Bytes a backward over ``tokens`` tokens holds: every block's activations, or (``checkpoint``) every
        block's input and one block's recomputed activations; plus the fp32 gradient of the final hidden states."""
        one_block = tokens * self.activations_per_token() * dtype_bytes
        kept = self.layers * tokens * self.hidden * dtype_bytes + one_block if checkpoint else self.layers * one_block
        return kept + tokens * self.hidden * FP32

    def largest_linear(self) -> int:
        """Weights of the largest pruned linear of a block."""
        return max(o * i for o, i in self.block_linears().values())

    def xtx_bytes(self) -> int:
        """fp32 ``sum x x^T`` of every linear of one block (one ``in x in`` matrix each)."""
        return sum(i * i for _, i in self.block_linears().values()) * FP32


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
            statistics plus (SparseGPT) its ``xtx`` matrices.
        grad_pass_bytes: gradient-pass transient: two gathered blocks' parameters in the
            model dtype, one micro-batch's activations kept for the backward
            (:meth:`ModelShape.activations_per_token` in every block, or with activation
            checkpointing every block's input plus one block's activations), its fp32
            final-hidden gradient, the loss's logits chunk (no full logits are built), and the
            per-sample statistic fold (:attr:`fold_bytes`); 0 for gradient-free methods.
        fold_bytes: the part of ``grad_pass_bytes`` the per-sample statistics take: one linear's
            per-sample products of a micro-batch and its statistics, and (``W > 1``) up to
            :data:`FOLD_PENDING` full fp32 statistics waiting for their reduce-scatter.
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
    offload_stats: bool = False, second_order: bool = False,
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
        checkpoint: the gradient pass recomputes each block's activations in the backward
            (``backend.activation_checkpointing``).
        offload_stats: the statistic partitions are kept in host memory (``backend.offload_stats``).
        second_order: SAAP with the ``element2`` estimator (it also keeps ``grad_sq``).

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
    largest = 0 if saap else block * FP32 + len(kinds) * block_lin * FP32 + (s.xtx_bytes() if xtx else 0)
    if reconstruct == "block":  # Adam's two moments and the gradient of the kept weights, one sequence's backward
        largest += 3 * block_lin * FP32 + seq_len * s.activations_per_token() * FP32
    grad_pass = comm_seq = fold = 0
    if kinds:
        # the activations kept for the backward, the fp32 gradient w.r.t. the final hidden states, the loss's chunk
        acts = s.backward_bytes(grad_batch * seq_len, dtype_bytes, checkpoint) + LOSS_CHUNK_ELEMENTS * FP32
        # one linear's (B, out, in) per-sample products (compute dtype, then fp32) and its statistics, plus the
        # full fp32 statistics in flight to their reduce-scatter
        fold = s.largest_linear() * (grad_batch * (dtype_bytes + FP32) + len(kinds) * FP32
                                     + (FOLD_PENDING * FP32 if w > 1 else 0))
        grad_pass = 2 * block * dtype_bytes + acts + fold
        gathers = 3 if checkpoint else 2  # forward and backward; a recomputed forward gathers each block again
        comm_seq = round(ring * (gathers * total * dtype_bytes + len(kinds) * linear_params * FP32) / grad_batch)
    act_stats = sum(FP32 * i + (FP32 * i * i if xtx else 0) for _, i in s.block_linears().values())
    act_allreduce = 2 * ring * act_stats * s.layers if method not in ("magnitude", "saap") or xtx else 0
    return Plan(
        workers=w, method=method, grad_kinds=kinds, total_params=total,
        param_bytes=math.ceil(total * dtype_bytes / w), grad_stat_bytes=stats, calib_bytes=calib,
        largest_block_bytes=largest, grad_pass_bytes=grad_pass, comm_per_seq_bytes=comm_seq,
        comm_block_pass_bytes=0 if saap else round(ring * total * dtype_bytes + act_allreduce), fold_bytes=fold,
        activation_checkpointing=checkpoint and bool(kinds), offload_stats=offload_stats and bool(kinds),
    )


def run_plan_kwargs(cfg: Any, workers: int | None = None) -> dict[str, Any]:
    """:func:`plan`'s keyword arguments for a run config (a ``RunConfig``; read, not imported)."""
    pr, b, st = cfg.pruning, cfg.backend, cfg.structured
    return dict(workers=workers or b.workers, method="saap" if st.enabled else pr.method, norm=pr.gblm.norm,
                num_samples=cfg.calibration.num_samples, seq_len=cfg.calibration.seq_len,
                dtype_bytes=4 if cfg.model.dtype == "float32" else 2, grad_batch=b.grad_batch_size,
                reconstruct=pr.reconstruct, offload_stats=b.offload_stats,
                second_order="element2" in st.estimators)


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
) -> int:
    """Smallest ``W`` whose predicted peak, times ``safety_factor``, fits in ``gpu_bytes``.

    Args:
        model_config: as for :func:`plan` (so are ``method``, ``norm``, ``num_samples``,
            ``seq_len``, ``dtype_bytes``, ``grad_batch``, ``reconstruct``, ``checkpoint``, ``offload_stats`` and
            ``second_order``).
        gpu_bytes: memory of one GPU in bytes.
        safety_factor: multiplier (>= 1) on the predicted peak to leave headroom.
        max_workers: search limit.

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
                 checkpoint=checkpoint, offload_stats=offload_stats, second_order=second_order)
        return p.peak_bytes * safety_factor <= gpu_bytes

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
            ("peak per worker", "peak_bytes"),
            ("comm per sequence", "comm_per_seq_bytes"), ("comm block pass", "comm_block_pass_bytes"),
        )
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'item':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
