"""Wall time of a run's phases, predicted from the work the planner counts (pure Python: no torch, no Ray).

Each phase is modelled per worker as matmul FLOPs at the accelerator's matmul rate, plus the bytes the
elementwise work and the per-sample statistic fold move at its memory bandwidth, plus the collective
volume of :func:`orchestrator.planner.plan` at its link bandwidth. The workers run in lock-step, so a
phase takes as long as one worker's share. Profiles of published accelerators use their dense peak
times an achieved fraction; the CPU profile is measured on the machine itself
(:func:`orchestrator.engine.profile.measure_cpu`), which is what the predictions are checked against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from orchestrator.inputs.config import resolve_compute_dtype
from orchestrator.planner import plan
from orchestrator.shapes import FP32, ModelShape, element_bytes


@dataclass(frozen=True)
class Accelerator:
    """What one worker's device sustains.

    Attributes:
        name: what it is.
        fp32_flops: matmul FLOP/s in fp32 (torch's default precision: no TF32).
        bf16_flops: matmul FLOP/s in bf16.
        mem_bw: bytes/s of elementwise work.
        link_bw: bytes/s each worker moves in a ring collective (NVLink within a node; gloo on a CPU).
        score_rate: weights/s the scorer prunes with the run's method (its score, a stable row-wise sort, the mask).
        native_bf16: whether it computes bf16 natively (what an ``auto`` compute dtype resolves with).
        fp32_efficiency: ``(forward, forward + backward)`` of a real block in fp32 against
            :func:`block_model_seconds` (1.0: as modelled; measured for a CPU,
            :func:`orchestrator.engine.profile.block_efficiency`; the GPU profiles' matmul rates already carry
            their achieved fraction).
        bf16_efficiency: the same under bf16 autocast.
        module_s: seconds ZeRO-3 spends per module and parameter gather beyond the copy (hooks, fetch, release).
        startup_s: seconds to start a ZeRO-3 engine for the gradient pass.
        block_call_s: seconds of driver round trip per block of the block pass.
        block_copy_bw: bytes/s of the block pass's per-block copies (the gathered block into a plain one, the
            statistics and results), counted over the block's linear weights in fp32 (0: not modelled).
        alloc_bw: bytes/s written into memory just allocated (0: not modelled). A CPU's allocator hands big
            blocks back to the kernel at every free, so each ZeRO-3 gather writes fresh pages the kernel first
            zeroes and maps; a GPU's caching allocator reuses its blocks and the collective's own write is in
            :attr:`link_bw`.
        fold_bw: bytes/s of the block pass's statistic fold (:func:`fold_bytes_per_token`; 0: :attr:`mem_bw`);
            measured on a CPU, where the fold's small elementwise steps run well below the streaming bandwidth.
        save_bw: bytes/s the machine writes a checkpoint (serialise, hash, write, fsync), all its workers
            together (0: not modelled).
        sharers: how many processes share the device (:meth:`shared`); :meth:`alone` undoes it.
    """

    name: str
    fp32_flops: float
    bf16_flops: float
    mem_bw: float
    link_bw: float
    score_rate: float
    native_bf16: bool = True
    fp32_efficiency: tuple[float, float] = (1.0, 1.0)
    bf16_efficiency: tuple[float, float] = (1.0, 1.0)
    module_s: float = 0.0
    startup_s: float = 0.0
    block_call_s: float = 0.0
    block_copy_bw: float = 0.0
    alloc_bw: float = 0.0
    fold_bw: float = 0.0
    save_bw: float = 0.0
    sharers: float = 1.0

    def dtype(self, name: str) -> str:
        """A config compute dtype with ``auto`` resolved for this accelerator."""
        return resolve_compute_dtype(name, self.native_bf16)

    def efficiency(self, dtype: str) -> tuple[float, float]:
        """``(forward, forward + backward)`` efficiency of a block under ``dtype``."""
        return self.fp32_efficiency if self.dtype(dtype) == "float32" else self.bf16_efficiency

    def shared(self, factor: float) -> Accelerator:
        """This accelerator as each of ``factor`` processes sees it when they share it (more CPU workers x threads
        than cores): every rate divided by ``factor``, every fixed cost multiplied. The link too: a CPU's
        collectives (gloo over loopback) are copies the same cores make."""
        if factor <= 1:
            return self
        return self._scaled(factor, f"{self.name}, shared by {factor:g}")

    def alone(self) -> Accelerator:
        """This accelerator unshared: what one process gets while the others wait (the block pass's scorer)."""
        return self if self.sharers == 1 else self._scaled(1 / self.sharers, self.name.split(", shared by")[0])

    def _scaled(self, factor: float, name: str) -> Accelerator:
        return replace(self, name=name, fp32_flops=self.fp32_flops / factor, bf16_flops=self.bf16_flops / factor,
                       mem_bw=self.mem_bw / factor, link_bw=self.link_bw / factor,
                       score_rate=self.score_rate / factor, module_s=self.module_s * factor,
                       startup_s=self.startup_s * factor, block_call_s=self.block_call_s * factor,
                       block_copy_bw=self.block_copy_bw / factor, alloc_bw=self.alloc_bw / factor,
                       fold_bw=self.fold_bw / factor, sharers=self.sharers * factor)

    def fresh_seconds(self, nbytes: float) -> float:
        """Seconds to write ``nbytes`` into newly allocated memory (0 where :attr:`alloc_bw` is not modelled)."""
        return nbytes / self.alloc_bw if self.alloc_bw else 0.0

    def fold_seconds(self, nbytes: float) -> float:
        """Seconds the block pass's statistic fold takes to move ``nbytes``."""
        return nbytes / (self.fold_bw or self.mem_bw)

    def flops(self, dtype: str) -> float:
        """Matmul FLOP/s of ``dtype`` (fp16 runs at the bf16 rate; ``auto`` as :meth:`dtype` resolves it)."""
        return self.fp32_flops if self.dtype(dtype) == "float32" else self.bf16_flops


#: achieved fraction of the dense peak in a transformer's matmuls (a typical model FLOPs utilisation)
GPU_MFU = 0.45
#: published dense peaks (FLOP/s: fp32 without TF32, bf16), HBM and NVLink bandwidths, bytes/s; 8 per node
#: scoring and a row-wise (segmented radix) sort move each weight through memory about this many times
SORT_PASSES = 16
#: bytes/s a GPU node writes checkpoints (an assumption: one local NVMe drive shared by the node's 8 workers)
NODE_SAVE_BW = 2e9
#: iterations of the ADMM support search per linear (30-36 measured on SmolLM2-135M, 50% and 2:4)
ADMM_ITERS = 33
PROFILES: dict[str, Accelerator] = {
    name: Accelerator(label, fp32 * GPU_MFU, bf16 * GPU_MFU, hbm * 0.7, link * 0.7, hbm * 0.7 / (4 * SORT_PASSES),
                      save_bw=NODE_SAVE_BW)
    for name, label, fp32, bf16, hbm, link in (
        ("h100", "H100 SXM 80 GB, NVLink 4", 67e12, 989e12, 3.35e12, 450e9),
        ("h200", "H200 SXM 141 GB, NVLink 4", 67e12, 989e12, 4.8e12, 450e9),
        ("a100", "A100 SXM 80 GB, NVLink 3", 19.5e12, 312e12, 2.0e12, 300e9),
    )
}


def _attention_flops(s: ModelShape, seq_len: int) -> float:
    """Forward FLOPs per token of the attention products (``QK^T`` and ``AV``, causal: half the square)."""
    return s.layers * 2 * seq_len * s.heads * s.head_dim


def _head_flops(s: ModelShape) -> float:
    return 2 * s.vocab * s.hidden


def fold_bytes_per_token(s: ModelShape) -> int:
    """Bytes the block pass's first forward moves per token and block to fold every linear's input into its
    ``sum x^2``: the input read in fp32, its square written and read back (``q``, ``k`` and ``v`` each fold
    the same input)."""
    return sum(3 * FP32 * i for _, i in s.block_linears().values())


def block_model_seconds(acc: Accelerator, s: ModelShape, seq_len: int, dtype: str, sequences: int = 1
                        ) -> tuple[float, float]:
    """Modelled seconds of one block on ``sequences`` sequences of ``seq_len`` tokens: ``(forward, forward +
    backward)``.

    Forward: ``2 x`` the block's linear parameters plus the causal attention products per token, at the matmul
    rate, and every saved activation written and read once; the backward adds input and weight gradients
    (``4 x``) and reads the activations twice more.
    """
    tokens = sequences * seq_len
    lin = s.block_linear_params()
    attn = _attention_flops(s, seq_len) / s.layers
    act = s.activations_per_token() * element_bytes(acc.dtype(dtype))  # bytes per token and block
    fwd = tokens * (2 * lin + attn) / acc.flops(dtype) + tokens * act * 2 / acc.mem_bw
    fwd_bwd = tokens * (6 * lin + 3 * attn) / acc.flops(dtype) + tokens * act * 4 / acc.mem_bw
    return fwd, fwd_bwd


def zero3_modules(s: ModelShape) -> int:
    """Parameter-holding modules ZeRO-3 gathers one by one: each block's linears and two norms, the embedding,
    the final norm and (untied) the head."""
    return s.layers * (len(s.block_linears()) + 2) + 2 + (0 if s.tied else 1)


def predict_phases(model_config: Any, acc: Accelerator, *, workers: int, method: str, num_samples: int,
                   seq_len: int, grad_batch: int = 4, dtype_bytes: int = 4, forward_dtype: str = "float32",
                   grad_dtype: str = "float32", checkpoint: bool = False, sequential: bool = True,
                   reconstruct: str = "none", eval_windows: int = 0, eval_seq_len: int = 512,
                   eval_workers: int = 1, grad_samples: int | None = None, eval_dtype: str | None = None,
                   grad_saves: int = 0, search: str = "none") -> dict[str, float]:
    """Predicted seconds of the gradient pass, the block pass and one model's evaluation.

    Args:
        model_config: as for :func:`orchestrator.planner.plan`.
        acc: the workers' accelerator.
        workers: pruning workers (the statistics and the sequences are split over them).
        method: the pruning method (``saap``: the structured importance pass only).
        num_samples: calibration sequences.
        seq_len: their length.
        grad_batch: sequences per forward/backward of the gradient pass.
        dtype_bytes: bytes per parameter.
        forward_dtype: autocast dtype of the block pass.
        grad_dtype: autocast dtype of the gradient pass.
        checkpoint: activation checkpointing in the gradient pass.
        sequential: the block pass re-forwards each pruned block.
        reconstruct: ``pruning.reconstruct`` (``layer`` and ``block`` solve per layer; ``block`` is not modelled
            beyond that).
        eval_windows: perplexity windows of one evaluation (0: no evaluation phase).
        eval_seq_len: their length.
        eval_workers: evaluation actors (windows split over them).
        eval_dtype: the dtype evaluation computes in: the model's (``model.dtype``; no autocast). None: fp32 for
            4-byte parameters, else bf16.
        grad_saves: checkpoints of the gradient statistics during the gradient pass (:func:`gradient_saves`).
        grad_samples: windows of the gradient pass (``gblm.grad_samples``; None: all ``num_samples``).
        search: ``pruning.search`` (``admm``: the support search's iterations and eigendecompositions).

    Returns:
        phase -> seconds (``gradient_pass`` for gradient methods and SAAP, ``block_pass`` for one-shot methods,
        ``eval`` when ``eval_windows``, ``checkpoints`` when ``grad_saves`` and the accelerator's save rate are
        known: every rank's statistic partitions written that many times, within the gradient pass's wall time).
    """
    p = plan(model_config, workers=workers, method=method, num_samples=num_samples, seq_len=seq_len,
             dtype_bytes=dtype_bytes, grad_batch=grad_batch, reconstruct=reconstruct, checkpoint=checkpoint)
    s = ModelShape.from_config(model_config)
    lin = s.layers * s.block_linear_params()
    seqs = math.ceil(num_samples / workers)  # every worker runs as many sequences (padding included)
    tokens = seqs * seq_len
    out: dict[str, float] = {}
    if p.grad_kinds:
        # gblm.grad_samples: the gradient pass runs on K evenly spaced windows, spread over the shards
        g_seqs = math.ceil(min(grad_samples or num_samples, num_samples) / workers)
        g_tokens = g_seqs * seq_len
        batches = math.ceil(g_seqs / grad_batch)
        fwd, fwd_bwd = block_model_seconds(acc, s, seq_len, grad_dtype, grad_batch)
        # every block forward and backward (a recompute: one forward more), input and per-sample weight gradients
        eff_fwd, eff_fwd_bwd = acc.efficiency(grad_dtype)
        blocks = batches * s.layers * (fwd_bwd / eff_fwd_bwd + (fwd / eff_fwd if checkpoint else 0.0))
        head = g_tokens * 2 * _head_flops(s) / acc.flops("float32")  # the logits-free loss runs in fp32 on purpose
        # the fold reads and writes each micro-batch's per-sample products and statistics about six times in fp32
        fold = batches * lin * FP32 * (6 * grad_batch + 2 * len(p.grad_kinds)) / acc.mem_bw
        gathers = batches * (3 if checkpoint else 2)  # every block's parameters, forward and backward (and recompute)
        # each gather materialises the full parameters in fresh memory; the engine starts by zeroing the statistics
        zero3 = (acc.startup_s + gathers * zero3_modules(s) * acc.module_s
                 + acc.fresh_seconds(gathers * s.total_params() * dtype_bytes + sum(p.grad_stat_bytes.values())))
        comm = p.comm_per_seq_bytes * g_seqs / acc.link_bw if workers > 1 else 0.0
        out["gradient_pass"] = blocks + head + fold + zero3 + comm
        if grad_saves and acc.save_bw:
            out["checkpoints"] = grad_saves * workers * sum(p.grad_stat_bytes.values()) / acc.save_bw
    if method != "saap":
        passes = 2 if sequential else 1
        fwd, _ = block_model_seconds(acc, s, seq_len, forward_dtype)
        compute = seqs * passes * s.layers * fwd / acc.efficiency(forward_dtype)[0]
        compute += acc.fold_seconds(tokens * s.layers * fold_bytes_per_token(s))  # the first forward's statistics
        xtx = method in ("sparsegpt", "gblm-sparsegpt") or reconstruct != "none"
        ins = [i for _, i in s.block_linears().values()]
        if xtx:  # sum x x^T of every linear on every rank, then the scorer's per-layer solves (rank 0, not split)
            compute += tokens * s.layers * sum(2 * i * i for i in ins) / acc.flops(forward_dtype)
            solves = s.layers * sum(2 * o * i * i + i**3 for o, i in s.block_linears().values())
            compute += solves / acc.alone().flops(forward_dtype)  # while the others wait: the scorer has the machine
        if search == "admm":  # per linear, ADMM_ITERS (out, in) @ (in, in) products and one fp64 eigensolve (~9 i^3)
            admm = s.layers * sum(ADMM_ITERS * 2 * o * i * i + 9 * i**3 for o, i in s.block_linears().values())
            compute += admm / acc.alone().flops("float32")
        if method in ("magnitude", "wanda", "gblm"):  # the scorer ranks every row of every weight (rank 0, alone)
            compute += lin / acc.alone().score_rate
        # the block gathers, and every pruned weight and its mask on their way to the coordinator
        comm = (p.comm_block_pass_bytes if workers > 1 else 0.0) / acc.link_bw + lin * (dtype_bytes + 1) / acc.link_bw
        copies = lin * FP32 / acc.block_copy_bw if acc.block_copy_bw else 0.0
        # fresh memory per block: every rank's plain copy of the gathered block, and on the scorer (alone) the
        # gathered statistics (the scoring's own transients are in the measured score rate)
        copies += acc.fresh_seconds(s.layers * s.block_params() * FP32)
        copies += acc.alone().fresh_seconds(lin * len(p.grad_kinds) * FP32)
        out["block_pass"] = compute + s.layers * acc.block_call_s + copies + comm
    if eval_windows:
        ev_dtype = eval_dtype or ("float32" if dtype_bytes == FP32 else "bfloat16")
        eval_tokens = math.ceil(eval_windows / eval_workers) * eval_seq_len
        per_token = 2 * lin + _head_flops(s) + _attention_flops(s, eval_seq_len)
        ev_act = s.activations_per_token() * s.layers * element_bytes(acc.dtype(ev_dtype))
        out["eval"] = (eval_tokens * per_token / acc.flops(ev_dtype)
                       + eval_tokens * ev_act / acc.mem_bw) / acc.efficiency(ev_dtype)[0]
    return out


def gradient_saves(steps: int, every: int, interval_s: float, pass_s: float) -> int:
    """Checkpoints of the gradient statistics in a pass of ``steps`` sequences per rank taking ``pass_s``
    seconds: one every ``every`` sequences and one at the end, each only ``interval_s`` after the last."""
    by_count = math.ceil(steps / every)
    return min(by_count, math.floor(pass_s / interval_s)) if interval_s > 0 else by_count


def predict_run(cfg: Any, model_config: Any, acc: Accelerator, checkpoint: bool) -> dict[str, float]:
    """:func:`predict_phases` for a run config (a ``RunConfig``; read, not imported); a Ray run checkpoints its
    gradient statistics (:func:`gradient_saves`)."""
    from orchestrator.planner import run_plan_kwargs

    kw = {k: v for k, v in run_plan_kwargs(cfg).items()
          if k not in ("norm", "offload_stats", "second_order", "compute_bytes")}
    ev = cfg.eval
    args = dict(kw, forward_dtype=cfg.backend.forward_dtype, grad_dtype=cfg.pruning.gblm.grad_dtype,
                checkpoint=checkpoint, sequential=cfg.pruning.sequential,
                eval_windows=ev.num_windows if ev.enabled else 0, eval_seq_len=ev.seq_len,
                eval_workers=max(1, cfg.eval_workers()), eval_dtype=cfg.model.dtype,
                grad_samples=cfg.pruning.gblm.grad_samples)
    out = predict_phases(model_config, acc, **args)
    if cfg.backend.kind == "ray" and "gradient_pass" in out:  # a pass below the interval saves nothing
        k = min(cfg.pruning.gblm.grad_samples or cfg.calibration.num_samples, cfg.calibration.num_samples)
        b = cfg.backend
        saves = gradient_saves(math.ceil(k / kw["workers"]), b.checkpoint_every, b.checkpoint_interval_s,
                               out["gradient_pass"])
        out = predict_phases(model_config, acc, **args, grad_saves=saves)
    return out


def format_times(times: dict[str, float], acc: Accelerator) -> str:
    """One line: the predicted seconds of each phase on ``acc``."""
    parts = ", ".join(f"{k.replace('_', ' ')} {_dur(v)}" for k, v in times.items())
    return f"predicted time on {acc.name}: {parts}"


def _dur(sec: float) -> str:
    if sec < 120:
        return f"{sec:.1f} s"
    if sec < 7200:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def profile_dict(acc: Accelerator) -> dict[str, Any]:
    """The profile as JSON-ready numbers."""
    return asdict(acc)
