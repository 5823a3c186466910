"""Benchmark: how the distributed engine's costs grow with model size and workers, against the planner.

Seeded random LLaMA shapes from about 20M to about 1B parameters (byte vocabulary, so the blocks hold
nearly all of them), GBLM on ``backend: ray`` with 1, 2 and 4 ZeRO-3 workers, a few short calibration
sequences. Per run: each worker's parameter partition, statistic partitions and peak allocated bytes
above its start (measured: live tensors, what ``torch.cuda.max_memory_allocated`` counts on a GPU; the
peak RSS is kept too) against the planner's parameter shard, statistic shards and peak; gradient-pass
and block-pass seconds per calibration token against :func:`orchestrator.timing.predict_phases` on the
measured CPU profile. Each shape and worker count runs ``--repeats`` times and keeps the medians. Fits
the exponent of each cost against parameters (log-log least squares) and against workers; prints a
table, writes JSON (after every row) and a PNG; ``--fit`` solves the CPU overhead constants::

    python tests/benchmarks/scaling.py --out bench-out/scaling.json
    python tests/benchmarks/scaling.py --shapes s20m,s100m --workers 1,2 --repeats 1 --out /tmp/scaling.json
    python tests/benchmarks/scaling.py --fit --out bench-out/scaling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from actors.distributed import run_ray
from orchestrator.engine.profile import measure_cpu
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.data import calibration_windows
from orchestrator.inputs.models import load_tokenizer, materialize
from orchestrator.planner import ModelShape, plan
from orchestrator.timing import Accelerator, predict_phases, profile_dict

log = logging.getLogger("bench.scaling")

#: (layers, hidden, heads, kv_heads, intermediate) of each shape; vocabulary 257 (bytes)
SHAPES = {
    "s20m": (6, 512, 8, 4, 1408),
    "s100m": (12, 768, 12, 4, 2048),
    "s300m": (20, 1024, 16, 8, 2816),
    "s1b": (16, 2048, 16, 8, 5632),
}


def make_cfg(shape: str, workers: int, args: argparse.Namespace) -> RunConfig:
    """GBLM on ``workers`` ZeRO-3 workers for one shape, calibrated on text Python ships."""
    layers, hidden, heads, kv, inter = SHAPES[shape]
    cfg = RunConfig()
    cfg.model.source = "tiny"
    t = cfg.model.tiny
    t.layers, t.hidden, t.heads, t.kv_heads, t.intermediate, t.max_positions = layers, hidden, heads, kv, inter, 512
    cfg.calibration.source = "builtin:python-topics-calibration"
    cfg.calibration.num_samples = args.samples
    cfg.calibration.seq_len = args.seq_len
    cfg.pruning.method = "gblm"
    cfg.backend.kind = "ray"
    cfg.backend.workers = workers
    cfg.backend.grad_batch_size = args.grad_batch
    cfg.backend.num_threads = max(1, (os.cpu_count() or 1) // workers)  # 4 workers on 2 cores: one thread each
    cfg.backend.activation_checkpointing = False
    cfg.backend.forward_dtype = cfg.pruning.gblm.grad_dtype = "float32"  # the profile's fp32 rate on any machine
    cfg.eval.enabled = False
    return cfg


def model_config(cfg: RunConfig) -> dict:
    t = cfg.model.tiny
    return {"hidden_size": t.hidden, "intermediate_size": t.intermediate, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads, "vocab_size": 257,
            "tie_word_embeddings": False}


_PROFILES: dict[tuple[str, int], object] = {}


def predict(shape: str, workers: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """The planner's and the timing model's prediction for one run, and the CPU profile it used (measured once
    per shape and thread count, while nothing else runs)."""
    cfg = make_cfg(shape, workers, args)
    mc = model_config(cfg)
    key = (shape, cfg.backend.num_threads)
    if key not in _PROFILES:
        t = cfg.model.tiny  # the CPU measured at the run's matmul shape (one micro-batch's tokens)
        _PROFILES[key] = measure_cpu(cfg.backend.num_threads, args.grad_batch * args.seq_len, t.hidden,
                                     t.intermediate, shape=ModelShape.from_config(mc), method="gblm")
    # workers x threads beyond the cores: each worker gets its share of them
    acc = _PROFILES[key].shared(workers * cfg.backend.num_threads / (os.cpu_count() or 1))
    p = plan(mc, workers=workers, method="gblm", num_samples=args.samples, seq_len=args.seq_len, dtype_bytes=4,
             grad_batch=args.grad_batch, host_collectives=True)
    predicted = predict_phases(mc, acc, workers=workers, method="gblm", num_samples=args.samples,
                               seq_len=args.seq_len, grad_batch=args.grad_batch)
    tokens = args.samples * args.seq_len
    return {
        "param_bytes": p.param_bytes, "grad_stat_bytes": sum(p.grad_stat_bytes.values()),
        "peak_bytes": p.peak_bytes,
        "gradient_pass_s_per_token": predicted["gradient_pass"] / tokens,
        "block_pass_s_per_token": predicted["block_pass"] / tokens,
    }, profile_dict(acc)


def one_run(shape: str, workers: int, args: argparse.Namespace) -> dict:
    """Prune one shape on ``workers`` workers; measured and predicted costs."""
    predicted, profile = predict(shape, workers, args)  # before the run: the profile on a quiet machine
    cfg = make_cfg(shape, workers, args)
    path = materialize(cfg.model)
    calib = calibration_windows(cfg, path, load_tokenizer(path, cfg.model))  # (N, L)
    t0 = time.perf_counter()
    res = run_ray(cfg, path, calib, progress=False)
    wall = time.perf_counter() - t0
    tokens = args.samples * args.seq_len
    worst = max(res.memory, key=lambda m: m["peak_rss_bytes"])
    start = worst["rss_bytes_by_phase"]["start"]

    def allocated(m: dict) -> dict:  # live bytes above the rank's start, per phase
        base = m["allocated_bytes_by_phase"]["start"]
        return {k: v - base for k, v in m["peak_allocated_bytes_by_phase"].items()}

    by_rank = [allocated(m) for m in res.memory]
    sampled = max(m.get("allocation_sampling_seconds", 0.0) for m in res.memory)
    grad_sampled = max(m.get("gradient_pass_seconds", {}).get("sampling", 0.0) for m in res.memory)
    alloc = max(by_rank, key=lambda a: max(v for k, v in a.items() if k != "load"))
    return {
        "shape": shape, "params": ModelShape.from_config(model_config(cfg)).total_params(), "workers": workers,
        "wall_s": wall,
        "measured": {
            "param_bytes": max(m["model_state_bytes"] for m in res.memory),
            "grad_stat_bytes": max(m["grad_stat_bytes"] for m in res.memory),
            "peak_above_start_bytes": worst["peak_rss_bytes"] - start,
            "peak_above_start_by_phase": {k: v - start for k, v in worst.get("peak_rss_bytes_by_phase", {}).items()},
            "rss_above_start_by_phase": {k: v - start for k, v in worst["rss_bytes_by_phase"].items()},
            # what the plan's peak is: live bytes (the allocator's count; torch.cuda.max_memory_allocated on a GPU)
            # after loading, which stages the checkpoint through host memory
            "allocated_peak_bytes": max(v for k, v in alloc.items() if k != "load"),
            "allocated_peak_by_phase": alloc,
            "allocated_by_phase": {k: v - worst["allocated_bytes_by_phase"]["start"]
                                   for k, v in worst["allocated_bytes_by_phase"].items()},
            "gradient_pass_seconds": worst.get("gradient_pass_seconds", {}),
            # the phases less what the memory sampler took in them (the slowest worker's, bounding both phases)
            "allocation_sampling_seconds": sampled,
            "gradient_pass_s_per_token": (res.outcome.phases["gradient_pass"] - grad_sampled) / tokens,
            "block_pass_s_per_token": (res.outcome.phases["block_pass"] - (sampled - grad_sampled)) / tokens,
        },
        "predicted": predicted,
        "profile": profile,
    }


def median_run(runs: list[dict]) -> dict:
    """One row from repeated runs of a shape and worker count: every measured number the median over the runs
    (the machine is noisy), the runs' own measurements kept under ``runs``."""
    def med(values: list):
        if isinstance(values[0], dict):
            return {k: med([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        return sorted(values)[len(values) // 2] if isinstance(values[0], (int, float)) else values[0]

    return {**runs[0], "wall_s": med([r["wall_s"] for r in runs]), "measured": med([r["measured"] for r in runs]),
            "runs": [r["measured"] for r in runs]}


def exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of ``log y`` against ``log x`` (least squares); None with fewer than two points."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else None


COSTS = ("param_bytes", "grad_stat_bytes", "gradient_pass_s_per_token", "block_pass_s_per_token")


def fits(rows: list[dict]) -> dict:
    """Exponents of every measured cost against parameters (per worker count) and against workers (per shape)."""
    out: dict = {"vs_params": {}, "vs_workers": {}}
    for w in sorted({r["workers"] for r in rows}):
        sel = sorted((r for r in rows if r["workers"] == w), key=lambda r: r["params"])
        out["vs_params"][str(w)] = {c: exponent([r["params"] for r in sel], [r["measured"][c] for r in sel])
                                    for c in COSTS}
    for s in sorted({r["shape"] for r in rows}):
        sel = sorted((r for r in rows if r["shape"] == s), key=lambda r: r["workers"])
        out["vs_workers"][s] = {c: exponent([r["workers"] for r in sel], [r["measured"][c] for r in sel])
                                for c in COSTS}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Cost against parameters (one line per worker count), measured (solid) and predicted (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, c, c) for c in COSTS] + [("peak allocated bytes", "allocated_peak_bytes", "peak_bytes")]
    fig, axes = plt.subplots(1, len(panels), figsize=(22, 4.2))
    for ax, (title, meas, pred) in zip(axes, panels, strict=True):
        for w in sorted({r["workers"] for r in rows}):
            sel = sorted((r for r in rows if r["workers"] == w), key=lambda r: r["params"])
            xs = [r["params"] for r in sel]
            line, = ax.plot(xs, [r["measured"][meas] for r in sel], "o-", label=f"{w} worker(s)")
            ax.plot(xs, [r["predicted"][pred] for r in sel], "--", color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("rayprune scaling: measured (solid) vs planner (dashed), per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: the rows the CPU overhead constants were fitted on (``orchestrator.engine.profile.CPU_OVERHEADS``)
FITTED = {("s20m", 1), ("s100m", 1), ("s300m", 1), ("s20m", 2), ("s100m", 2), ("s300m", 2)}


#: the constants of ``CPU_OVERHEADS`` each phase's fit solves for (the prediction is linear in each)
OVERHEAD_TERMS = {"gradient_pass": ("module_s", "startup_s"), "block_pass": ("block_call_s", "block_copy_s")}


def _with(profile: dict, **values: float) -> Accelerator:
    """The row's profile with overhead constants replaced (``block_copy_s``: seconds per byte, 1 / bandwidth)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in profile.items()}
    if "block_copy_s" in values:
        per_byte = values.pop("block_copy_s")
        values["block_copy_bw"] = 1 / per_byte if per_byte else 0.0
    return Accelerator(**{**fields, **values})


def fit_overheads(rows: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Least squares, in relative error, of the overhead constants on the :data:`FITTED` rows: each phase's
    prediction is its overhead-free part plus each constant times its own (linear) term."""
    import numpy as np

    out: dict[str, float] = {}
    tokens = args.samples * args.seq_len
    for phase, names in OVERHEAD_TERMS.items():
        lhs, rhs = [], []
        for r in (r for r in rows if (r["shape"], r["workers"]) in FITTED):
            cfg = make_cfg(r["shape"], r["workers"], args)

            def predicted(acc: Accelerator, r: dict = r, cfg: RunConfig = cfg, phase: str = phase) -> float:
                return predict_phases(model_config(cfg), acc, workers=r["workers"], method="gblm",
                                      num_samples=args.samples, seq_len=args.seq_len,
                                      grad_batch=args.grad_batch)[phase]

            zero = {n: 0.0 for n in names}
            base = predicted(_with(r["profile"], **zero))
            measured = r["measured"][f"{phase}_s_per_token"] * tokens
            lhs.append([(predicted(_with(r["profile"], **{**zero, n: 1.0})) - base) / measured for n in names])
            rhs.append((measured - base) / measured)
        sol = np.linalg.lstsq(np.array(lhs), np.array(rhs), rcond=None)[0]
        out.update(zip(names, (float(x) for x in sol), strict=True))
    out["block_copy_bw"] = 1 / out.pop("block_copy_s")
    return out


def table(rows: list[dict]) -> str:
    head = ("| shape | params | W | param MiB meas/plan | stats MiB meas/plan | peak allocated MiB meas/plan (ratio) | "
            "peak RSS MiB (host) | grad ms/tok meas/pred (ratio) | block ms/tok meas/pred (ratio) | overheads |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    mib = 2**20
    for r in rows:
        m, p = r["measured"], r["predicted"]
        g, b = m["gradient_pass_s_per_token"], m["block_pass_s_per_token"]
        pg, pb = p["gradient_pass_s_per_token"], p["block_pass_s_per_token"]
        peak = m.get("allocated_peak_bytes", m["peak_above_start_bytes"])
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {r['workers']} | {m['param_bytes'] / mib:.0f} / "
            f"{p['param_bytes'] / mib:.0f} | {m['grad_stat_bytes'] / mib:.0f} / {p['grad_stat_bytes'] / mib:.0f} | "
            f"{peak / mib:.0f} / {p['peak_bytes'] / mib:.0f} ({peak / p['peak_bytes']:.2f}) | "
            f"{m['peak_above_start_bytes'] / mib:.0f} | "
            f"{1e3 * g:.2f} / {1e3 * pg:.2f} ({g / pg:.2f}) | {1e3 * b:.2f} / {1e3 * pb:.2f} ({b / pb:.2f}) | "
            f"{'fitted' if (r['shape'], r['workers']) in FITTED else 'held out'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON path (the PNG goes next to it)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--grad-batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per shape and worker count (their median is kept)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG and the table from --out")
    ap.add_argument("--fit", action="store_true",
                    help="print the least-squares CPU overhead constants (CPU_OVERHEADS) of --out's fitted rows")
    ap.add_argument("--repredict", action="store_true",
                    help="recompute every row's prediction of --out with the current planner and timing model "
                         "(the CPU profiled anew), keep the measurements, rewrite JSON and PNG")
    args = ap.parse_args()
    if args.replot or args.repredict or args.fit:
        out = Path(args.out)
        result = json.loads(out.read_text())
        if args.fit:
            run_args = argparse.Namespace(samples=result["samples"], seq_len=result["seq_len"],
                                          grad_batch=result["grad_batch"])
            print(json.dumps(fit_overheads(result["rows"], run_args), indent=2))
            return
        if args.repredict:
            run_args = argparse.Namespace(samples=result["samples"], seq_len=result["seq_len"],
                                          grad_batch=result["grad_batch"])
            for row in result["rows"]:
                row["predicted"], row["profile"] = predict(row["shape"], row["workers"], run_args)
            out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result["rows"], out.with_suffix(".png"))
        print(table(result["rows"]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import ray

    from actors.memory import TRACE_MEMORY_ENV

    os.environ[TRACE_MEMORY_ENV] = "1"  # the workers sample their allocated bytes around every module
    # more workers than cores is allowed here on purpose (the cost against W is what is measured)
    ray.init(num_cpus=max(max(int(x) for x in args.workers.split(",")), os.cpu_count() or 1),
             include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        for w in (int(x) for x in args.workers.split(",")):
            rows.append(median_run([one_run(shape, w, args) for _ in range(args.repeats)]))
            log.info("%s x%d done: %s", shape, w, json.dumps(rows[-1]["measured"]))
            result = {"rows": rows, "fits": fits(rows), "samples": args.samples, "seq_len": args.seq_len,
                      "repeats": args.repeats,
                      "grad_batch": args.grad_batch, "torch": torch.__version__}
            out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(json.dumps(fits(rows), indent=2))


if __name__ == "__main__":
    main()
