"""The GPU suite's rows (run by ``tests/gpu/check.py``): each takes the shared :class:`Context` and returns a
dict with ``ok`` and what it measured, or raises :class:`Skip` when what it needs is not on the machine."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

#: keys the summary table prints
SUMMARY = ("masks_equal", "ppl_rel", "devices", "phases", "rel_err", "syncs", "columns", "state_bytes", "nccl")

TEXT = ("The package manager resolves dependencies, downloads archives and configures services. "
        "A function returns a value; a class defines methods and attributes; modules group code. ") * 200
#: a random LLaMA large enough for the allocator's peaks to mean something (45M parameters)
MEDIUM = {"layers": 4, "hidden": 1024, "heads": 16, "kv_heads": 4, "intermediate": 2816, "max_positions": 512,
          "seed": 1}
#: bytes the measured peak may exceed the plan by (the allocator's 2 MiB segments, cuBLAS's workspace)
PLAN_SLACK = 64 * 2**20


class Skip(Exception):
    """What the row needs is not on this machine (the reason is reported)."""


class Context:
    """What rows share: the GPU worker groups (started once), an evaluation actor, reference masks."""

    def __init__(self, gpu: bool = True) -> None:
        self.gpu = gpu  # False: the CPU dry run (CPU actors on gloo; the CUDA-only rows skip)
        self.dev = "cuda" if gpu else "cpu"
        self.groups: dict[tuple[int, float], Any] = {}
        self.evaluator: Any = None
        self.masks: dict[str, dict[str, torch.Tensor]] = {}

    def workers(self, n: int = 1, fraction: float = 0.5) -> Any:
        """A ZeRO-3 pruning group of ``n`` GPU ranks (NCCL), each holding ``fraction`` of a GPU (half by default:
        the evaluation actor takes the other half of the one GPU)."""
        from actors.distributed import start_workers
        from actors.group import GroupSpec

        key = (n, fraction)
        if key not in self.groups:
            self.groups[key] = start_workers(GroupSpec(n, use_gpu=self.gpu, backend="nccl" if self.gpu else "gloo",
                                                       deepspeed=True, num_threads=4, gpu_fraction=fraction))
        return self.groups[key]

    def eval_group(self) -> Any:
        """One evaluation actor on the GPU."""
        from actors.evaluator import EvalGroup
        from actors.group import GroupSpec
        from orchestrator.inputs.config import ModelConfig

        if self.evaluator is None:
            self.evaluator = EvalGroup(GroupSpec(1, use_gpu=self.gpu, backend=None, field="eval.workers",
                                                 gpu_fraction=0.5),
                                       ModelConfig(source="tiny"))
        return self.evaluator

    def close(self) -> None:
        """Shut every group down (the GPU is free afterwards)."""
        for g in self.groups.values():
            g.shutdown()
        self.groups = {}
        if self.evaluator is not None:
            self.evaluator.shutdown()
            self.evaluator = None


def windows_of(tok: Any, n: int, seq: int, offset: int = 0) -> torch.Tensor:
    """``(n, seq)`` non-overlapping windows of the built-in text, starting ``offset`` windows in."""
    ids = torch.tensor(tok(TEXT)["input_ids"], dtype=torch.int64)
    if ids.numel() // seq < offset + n:
        ids = ids.repeat((offset + n) * seq // ids.numel() + 1)
    return ids[: (ids.numel() // seq) * seq].reshape(-1, seq)[offset : offset + n]


def run_config(method: str = "gblm", dtype: str = "float32", tiny: dict | None = None, **backend: Any) -> Any:
    """A ``backend: ray`` run config on the tiny (or given) random LLaMA with bf16 forwards."""
    from orchestrator.inputs.config import RunConfig, TinyModelConfig

    cfg = RunConfig()
    cfg.model.source, cfg.model.dtype = "tiny", dtype
    if tiny:
        cfg.model.tiny = TinyModelConfig(**tiny)
    cfg.pruning.method = method
    cfg.backend.kind, cfg.backend.workers, cfg.backend.forward_dtype = "ray", 1, "bfloat16"
    cfg.pruning.gblm.grad_dtype = "bfloat16"
    for k, v in backend.items():
        setattr(cfg.backend, k, v)
    return cfg


def data(cfg: Any, samples: int = 8, seq: int = 256, windows: int = 8) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(model path, calibration windows, evaluation windows)`` of ``cfg``'s model."""
    from orchestrator.inputs.models import load_tokenizer, materialize

    path = materialize(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    return path, windows_of(tok, samples, seq), windows_of(tok, windows, seq, samples + 8)


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Fraction of mask entries ``a`` and ``b`` agree on (same keys)."""
    same = sum(int((a[k].cpu() == b[k].cpu()).sum()) for k in a)
    return same / sum(m.numel() for m in a.values())


def devices_of(memory: list[dict]) -> dict[str, list[str]]:
    """Where every worker's parameters, statistics and masks lived (device types, all ranks together)."""
    return {k: sorted({d.split(":")[0] for m in memory for d in m["devices"][k]})
            for k in ("parameters", "statistics", "masks")}


def local_masks(cfg: Any, path: str, calib: torch.Tensor, windows: torch.Tensor) -> tuple[dict, float]:
    """The CPU local engine's masks and pruned perplexity for ``cfg`` (same forward dtype)."""
    from orchestrator.engine.device import Placement
    from orchestrator.engine.local import run_local
    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.inputs.models import load_model

    model = load_model(path, cfg.model)
    out = run_local(model, calib, cfg.pruning, Placement.of("cpu", cfg.backend.forward_dtype), progress=False)
    return out.masks, perplexity(model, windows)


def prune_row(ctx: Context, method: str, dtype: str = "float32", name: str | None = None,
              reference: str | None = None, **backend: Any) -> dict:
    """One pruning run on the GPU worker against the CPU engine (or against row ``reference``'s masks)."""
    from actors.distributed import run_ray

    name = name or f"prune-{method}"
    cfg = run_config(method, dtype, **backend)
    path, calib, windows = data(cfg)
    res = run_ray(cfg, path, calib, progress=False, group=ctx.workers())
    ctx.masks[name] = res.masks
    ev = ctx.eval_group()
    ppl_gpu = ev.perplexity(ev.ref(name, path, res.weights), windows)
    if reference and reference in ctx.masks:
        ref_masks, ppl_ref = ctx.masks[reference], None
    else:
        ref_masks, ppl_ref = local_masks(cfg, path, calib, windows)
    devices = devices_of(res.memory)
    stats_home = "cpu" if backend.get("offload_stats") else ctx.dev
    want = {"parameters": [ctx.dev], "masks": [ctx.dev],
            "statistics": [stats_home] if method in ("gblm", "gblm-sparsegpt") else []}
    row = {"masks_equal": agreement(ref_masks, res.masks), "ppl_gpu": ppl_gpu, "devices": devices,
           "recomputed_blocks": res.memory[0].get("recomputed_blocks", 0),
           "phases": {k: round(v, 2) for k, v in res.outcome.phases.items()}}
    if ppl_ref is not None:
        row.update(ppl_cpu=ppl_ref, ppl_rel=abs(ppl_gpu - ppl_ref) / ppl_ref)
    floor = 0.995 if dtype != "float32" else 0.999  # bf16 parameters: CPU and GPU kernels round apart
    row["ok"] = (row["masks_equal"] >= floor and row.get("ppl_rel", 0.0) <= 0.01 and devices == want
                 and (not backend.get("activation_checkpointing") or row["recomputed_blocks"] > 0))
    return row


def eval_shard_row(ctx: Context) -> dict:
    """The dense tiny model's perplexity from a one-rank ZeRO-3 evaluation group on the GPU against the CPU."""
    from actors.group import GroupSpec
    from actors.sharded_eval import ShardedEvalGroup
    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.inputs.models import load_model

    cfg = run_config()
    path, _, windows = data(cfg)
    ppl_cpu = perplexity(load_model(path, cfg.model), windows)
    ctx.close()  # the group below takes a whole GPU (or CPU)
    spec = GroupSpec(1, use_gpu=ctx.gpu, backend="nccl" if ctx.gpu else "gloo", deepspeed=True, field="eval.workers")
    group = ShardedEvalGroup(spec, cfg.model, False)
    try:
        ppl_gpu = group.perplexity(group.ref("dense", path), windows)
        device = group.group.execute("device_info")[0]["device"]
    finally:
        group.shutdown()
    rel = abs(ppl_gpu - ppl_cpu) / ppl_cpu
    return {"ppl_cpu": ppl_cpu, "ppl_gpu": ppl_gpu, "ppl_rel": rel, "device": device,
            "ok": rel <= 0.01 and device.startswith(ctx.dev)}


def plan_memory_row(ctx: Context) -> dict:
    """A 45M-parameter random LLaMA's allocator peaks per phase (``torch.cuda.max_memory_allocated`` windows)
    against the plan's terms: the plan must hold (measured <= predicted + :data:`PLAN_SLACK`)."""
    from actors.distributed import run_ray
    from orchestrator.inputs.models import config_only
    from orchestrator.planner import plan, run_plan_kwargs

    cfg = run_config("gblm", tiny=MEDIUM, grad_batch_size=4)
    cfg.calibration.num_samples, cfg.calibration.seq_len = 16, 256
    path, calib, _ = data(cfg, samples=16)
    ctx.close()  # this row's worker alone on the GPU
    res = run_ray(cfg, path, calib, progress=False, group=ctx.workers())
    m = res.memory[0]
    p = plan(config_only(cfg.model), checkpoint=False, host_collectives=False,
             **run_plan_kwargs(cfg, native_bf16=True))
    stats = sum(p.grad_stat_bytes.values())
    predicted = {"load": p.load_bytes, "gradient_pass": p.param_bytes + stats + p.grad_pass_bytes,
                 "block_pass": p.param_bytes + stats + p.calib_bytes + p.largest_block_bytes}
    start = m["allocated_bytes_by_phase"].get("start", 0)
    phases = {k: {"measured": m["peak_allocated_bytes_by_phase"][k] - start, "planned": v}
              for k, v in predicted.items() if k in m["peak_allocated_bytes_by_phase"]}
    for v in phases.values():
        v["ratio"] = round(v["measured"] / v["planned"], 3)
    return {"phases": phases, "traced": m.get("allocated_peak_traced"),
            "ok": len(phases) == 3 and all(v["measured"] <= v["planned"] + PLAN_SLACK for v in phases.values())}


def stats_fp32_row(ctx: Context) -> dict:
    """Activation and per-sample gradient statistics on the GPU under bf16 autocast with TF32 allowed, against
    fp64: within 1e-5 (a bf16 or TF32 fold would be off by 1e-3)."""
    from orchestrator.pruning.stats import ActivationStats, per_sample_weight_grad_stats

    _needs_cuda(ctx)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 256, 1024, device="cuda", generator=g).bfloat16()  # (B, T, in) as a bf16 forward gives
    go = torch.randn(4, 256, 512, device="cuda", generator=g)
    w = torch.ones(4, device="cuda")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32, as backend.tf32 allows for forwards
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            st = ActivationStats(1024, with_xtx=True, device="cuda")
            st.update(x)
            grads = per_sample_weight_grad_stats(x.float(), go, ("sq",), w)
    finally:
        torch.set_float32_matmul_precision(before)
    flat = x.reshape(-1, 1024).double()
    xtx_ref = flat.t() @ flat
    per = torch.einsum("bto,bti->boi", go.double(), x.double())
    rel = {"xtx": float((st.xtx.double() - xtx_ref).abs().max() / xtx_ref.abs().max()),
           "grad_sq": float(((grads["sq"].double() - (per * per).sum(0)).abs().max()) / (per * per).sum(0).max())}
    return {"rel_err": rel, "ok": max(rel.values()) <= 1e-5}


def sparsegpt_syncs_row(ctx: Context) -> dict:
    """Host synchronisations of SparseGPT on a 512 x 1024 GPU weight (CUDA's sync debug mode counts them)."""
    from orchestrator.pruning.sparsegpt import sparsegpt_prune

    _needs_cuda(ctx)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 1024, device="cuda", generator=g)
    h = 2 * x.t() @ x / 2048
    w = torch.randn(512, 1024, device="cuda", generator=g)
    counts = {}
    for label, nm in (("unstructured", None), ("2:4", (2, 4))):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                _, mask = sparsegpt_prune(w, h, 0.5, nm)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts[label] = sum("synchroniz" in str(s.message) for s in seen)
        assert mask.device.type == "cuda"
    return {"syncs": counts, "columns": 1024, "ok": max(counts.values()) <= 16}


def _needs_cuda(ctx: Context) -> None:
    if not ctx.gpu:
        raise Skip("needs CUDA (CPU dry run)")


def _nccl_probe(rank: int, port: int) -> None:
    """One of two processes on GPU 0: an NCCL all-reduce and reduce-scatter (raises on refusal)."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    out = torch.empty(2, device="cuda")
    dist.reduce_scatter_tensor(out, t)
    torch.cuda.synchronize()
    assert float(out.sum()) == 8.0
    dist.destroy_process_group()


def two_ranks_row(ctx: Context) -> dict:
    """Two ZeRO-3 ranks on the one GPU (half a GPU each in Ray): really partitioned, the one-process masks.
    Where NCCL refuses two ranks on one device, the row is skipped with NCCL's reason."""
    import socket

    import torch.multiprocessing as mp

    _needs_cuda(ctx)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_nccl_probe, args=(r, port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    if codes != [0, 0]:
        raise Skip(f"NCCL refuses two ranks on one GPU (exit codes {codes}; NCCL reports 'Duplicate GPU "
                   "detected' for two ranks of a communicator on one device); ZeRO-3's partitioning is checked "
                   "on CPU ranks (tests/integration)")
    from actors.distributed import run_ray

    ctx.close()
    cfg = run_config("gblm")
    cfg.backend.workers = 2
    path, calib, windows = data(cfg)
    res = run_ray(cfg, path, calib, progress=False, group=ctx.workers(2, 0.5))
    ref, _ = local_masks(cfg, path, calib, windows)
    state = [m["model_state_bytes"] for m in res.memory]
    ctx.close()
    return {"nccl": "two ranks on one GPU work", "masks_equal": agreement(ref, res.masks), "state_bytes": state,
            "ok": agreement(ref, res.masks) >= 0.999 and max(state) < 0.6 * sum(state)}


def saap_importance_row(ctx: Context) -> dict:
    """SAAP's fused importance of the tiny model on the GPU against the CPU: the same group order."""
    from orchestrator.inputs.config import StructuredConfig, TinyModelConfig
    from orchestrator.inputs.models import build_tiny_llama
    from orchestrator.structured.run import compute_importance

    model = build_tiny_llama(TinyModelConfig(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=1))
    ids = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(0))
    s = StructuredConfig(minibatches=2)
    cpu = compute_importance(copy.deepcopy(model), ids, s)
    gpu = compute_importance(copy.deepcopy(model).to(ctx.dev), ids, s)
    same = all(torch.equal(torch.argsort(cpu.fused[k], descending=True),
                           torch.argsort(gpu.fused[k].cpu(), descending=True)) for k in cpu.fused)
    rel = max(float((gpu.fused[k].cpu() - v).abs().max() / v.abs().max()) for k, v in cpu.fused.items())
    return {"group_order_equal": same, "rel_err": rel, "ok": same and rel < 1e-3}


def saap_ray_row(ctx: Context) -> dict:
    """SAAP's importance from one ZeRO-3 GPU worker with activation checkpointing against one CPU process."""
    from actors.importance import run_ray_importance
    from orchestrator.inputs.models import load_model
    from orchestrator.structured.run import compute_importance, distributed_importance

    cfg = run_config(activation_checkpointing=True)
    cfg.structured.enabled, cfg.structured.minibatches = True, 2
    path, _, _ = data(cfg)
    model = load_model(path, cfg.model)
    ids = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(0))
    cpu = compute_importance(copy.deepcopy(model), ids, cfg.structured)
    group = ctx.workers()

    def score(mods: list, shapes: dict, calib: torch.Tensor) -> Any:
        return run_ray_importance(cfg, path, calib, mods, shapes, group.spec, group=group)

    imp, memory = distributed_importance(model, ids, cfg.structured, score)
    same = all(torch.equal(torch.argsort(cpu.fused[k], descending=True),
                           torch.argsort(imp.fused[k], descending=True)) for k in cpu.fused)
    rel = max(float((imp.fused[k] - v).abs().max() / v.abs().max()) for k, v in cpu.fused.items())
    recomputed = memory[0]["recomputed_blocks"]
    return {"group_order_equal": same, "rel_err": rel, "recomputed_blocks": recomputed,
            "ok": same and rel < 1e-3 and recomputed > 0 and math.isfinite(rel)}


ROWS: dict[str, Callable[[Context], dict]] = {
    "stats-fp32": stats_fp32_row,
    "sparsegpt-syncs": sparsegpt_syncs_row,
    "prune-gblm": partial(prune_row, method="gblm"),
    "prune-wanda": partial(prune_row, method="wanda"),
    "prune-sparsegpt": partial(prune_row, method="sparsegpt"),
    "bf16-params-gblm": partial(prune_row, method="gblm", dtype="bfloat16", name="bf16-params-gblm"),
    "bf16-params-sparsegpt": partial(prune_row, method="sparsegpt", dtype="bfloat16", name="bf16-params-sparsegpt"),
    "checkpointing": partial(prune_row, method="gblm", name="checkpointing", reference="prune-gblm",
                             activation_checkpointing=True),
    "offload-stats": partial(prune_row, method="gblm", name="offload-stats", reference="prune-gblm",
                             offload_stats=True),
    "eval-shard": eval_shard_row,
    "saap-importance": saap_importance_row,
    "saap-ray-checkpointed": saap_ray_row,
    "plan-memory": plan_memory_row,
    "two-ranks-one-gpu": two_ranks_row,
}
