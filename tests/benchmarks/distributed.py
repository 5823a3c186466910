"""Benchmark: local vs Ray + ZeRO-3 pruning on SmolLM2-135M (BENCHMARK.md protocol).

Runs the chosen method with the local engine and with Ray on 1 and 2 workers, evaluates
perplexity and the agreement of each Ray run's masks with the local engine's, and measures the
gradient pass against a plain single-process torch forward/backward loop over the same
sequences (the textbook loop: batch 1, HF's loss over full logits, weight gradients of the
pruned matrices, all torch threads). The plain loop runs before the first Ray run and after
each one; the overhead ratio uses the median (the machine drifts by +-10% over minutes).
Prints a table and writes JSON::

    python tests/benchmarks/distributed.py --out bench-distributed.json
    python tests/benchmarks/distributed.py --workers 2 --samples 8 --eval-windows 8 --no-local
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from orchestrator.coordinator import eval_windows
from orchestrator.engine.local import pruned_weight_names, run_local
from orchestrator.evaluation.perplexity import perplexity
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.data import calibration_windows
from orchestrator.inputs.models import load_model, load_tokenizer, materialize

log = logging.getLogger("bench.distributed")
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def make_cfg(args: argparse.Namespace) -> RunConfig:
    """The run config of the protocol (method and sizes from the command line)."""
    cfg = RunConfig()
    cfg.model.source = args.model
    cfg.calibration.source = str(Path(args.data) / "calib-python-docs.parquet")
    cfg.calibration.num_samples = args.samples
    cfg.calibration.seq_len = args.seq_len
    cfg.eval.source = str(Path(args.data) / "eval-debian-handbook.parquet")
    cfg.eval.num_windows = args.eval_windows
    cfg.eval.seq_len = args.seq_len
    cfg.pruning.method = args.method
    cfg.pruning.pattern = args.pattern
    if args.grad_batch:
        cfg.backend.grad_batch_size = args.grad_batch
    return cfg


def plain_grad_loop(model, calib: torch.Tensor) -> float:
    """Seconds of a bare forward/backward loop (batch 1, pruned weights require grad, no statistics)."""
    names = set(pruned_weight_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    t0 = time.perf_counter()
    for i in range(calib.shape[0]):
        ids = calib[i : i + 1]
        model(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    return elapsed


def run_local_row(cfg: RunConfig, path: str, calib: torch.Tensor, windows: torch.Tensor | None,
                  masks: dict[str, torch.Tensor]) -> dict:
    """Prune with the local engine and evaluate; fills ``masks`` (name -> kept) for the agreement column."""
    model = load_model(path, cfg.model)
    outcome = run_local(model, calib, cfg.pruning, progress=True)
    params = dict(model.named_parameters())
    masks.update({n: params[n].detach() != 0 for n in pruned_weight_names(model)})
    ppl = perplexity(model, windows, True, "ppl local") if windows is not None else None
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"backend": "local", "workers": 1, "method": cfg.pruning.method, "ppl": ppl,
            "phases": {k: round(v, 2) for k, v in outcome.phases.items()},
            "peak_rss_bytes_per_worker": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024],
            "model_state_bytes_per_worker": [state]}


def run_ray_row(cfg: RunConfig, path: str, calib: torch.Tensor, windows: torch.Tensor | None, workers: int,
                threads: int, ref_masks: dict[str, torch.Tensor]) -> dict:
    """Prune with ``workers`` Ray actors, apply the weights to a dense model and evaluate."""
    from actors.distributed import run_ray, start_workers
    from actors.group import GroupSpec

    t0 = time.perf_counter()
    group = start_workers(GroupSpec(workers, num_threads=max(1, threads // workers), deepspeed=True))
    group_s = time.perf_counter() - t0
    try:
        res = run_ray(cfg, path, calib, progress=True, group=group)
    finally:
        group.shutdown()
    model = load_model(path, cfg.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in res.weights.items():
            params[name].copy_(w)
    ppl = perplexity(model, windows, True, f"ppl ray x{workers}") if windows is not None else None
    phases = {k: round(v, 2) for k, v in res.outcome.phases.items()}
    phases["group_start"] = round(group_s, 2)
    agree = None
    if ref_masks:
        same = sum(int(((res.weights[n] != 0) == m).sum()) for n, m in ref_masks.items())
        agree = same / sum(m.numel() for m in ref_masks.values())
    return {"backend": "ray", "workers": workers, "method": cfg.pruning.method, "ppl": ppl, "phases": phases,
            "mask_agreement_vs_local": agree,
            "peak_rss_bytes_per_worker": [m["peak_rss_bytes"] for m in res.memory],
            "model_state_bytes_per_worker": [m["model_state_bytes"] for m in res.memory],
            "grad_stat_bytes_per_worker": [m["grad_stat_bytes"] for m in res.memory],
            "rss_bytes_by_phase_per_worker": [m.get("rss_bytes_by_phase") for m in res.memory]}


def print_table(runs: list[dict], plain_s: float | None) -> None:
    """A plain-text table of the runs."""
    head = f"{'backend':8} {'W':>2} {'method':9} {'ppl':>9} {'grad s':>8} {'block s':>8} {'start s':>8} " \
           f"{'peak RSS MiB/worker':>22} {'state MiB/worker':>18} {'masks = local':>14}"
    lines = [head, "-" * len(head)]
    for r in runs:
        ph = r["phases"]
        rss = ",".join(f"{b / 2**20:.0f}" for b in r["peak_rss_bytes_per_worker"])
        st = ",".join(f"{b / 2**20:.0f}" for b in r["model_state_bytes_per_worker"])
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.3f}"
        agree = r.get("mask_agreement_vs_local")
        agree_s = "-" if agree is None else f"{100 * agree:.4f}%"
        lines.append(f"{r['backend']:8} {r['workers']:>2} {r['method']:9} {ppl:>9} "
                     f"{ph.get('gradient_pass', 0):>8.1f} {ph.get('block_pass', 0):>8.1f} "
                     f"{ph.get('startup', 0):>8.1f} {rss:>22} {st:>18} {agree_s:>14}")
    if plain_s is not None:
        lines.append(f"plain torch forward/backward loop (median): {plain_s:.1f} s")
    log.info("\n%s", "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-distributed.json", help="JSON output path")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA), help="folder with the protocol's parquet files")
    ap.add_argument("--method", default="gblm")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40, help="0: no perplexity")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads in total")
    ap.add_argument("--grad-batch", type=int, default=0, help="backend.grad_batch_size (0: the config default)")
    ap.add_argument("--no-local", action="store_true", help="skip the local engine run")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain forward/backward loop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    cfg = make_cfg(args)
    path = materialize(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    model = load_model(path, cfg.model)
    calib = calibration_windows(cfg, path, tok, model)  # (N, L)
    windows = eval_windows(cfg, tok, model) if args.eval_windows else None  # (K, L)
    plain_times = [] if args.no_plain else [plain_grad_loop(model, calib)]

    runs = []
    masks: dict[str, torch.Tensor] = {}
    if not args.no_local:
        runs.append(run_local_row(cfg, path, calib, windows, masks))
    workers = [int(w) for w in args.workers.split(",") if w]
    if workers:
        import ray

        ray.init(num_cpus=max(max(workers), args.threads), include_dashboard=False, log_to_driver=False)
        try:
            for w in workers:
                runs.append(run_ray_row(cfg, path, calib, windows, w, args.threads, masks))
                if plain_times:  # the machine drifts: bracket every Ray run with plain loops
                    plain_times.append(plain_grad_loop(model, calib))
        finally:
            ray.shutdown()
    del model
    plain_s = statistics.median(plain_times) if plain_times else None
    ratio = None
    ray_runs = [r for r in runs if r["backend"] == "ray" and "gradient_pass" in r["phases"]]
    if plain_s and ray_runs:
        ratio = max(ray_runs, key=lambda r: r["workers"])["phases"]["gradient_pass"] / plain_s
        for r in ray_runs:
            r["grad_pass_overhead_ratio"] = round(r["phases"]["gradient_pass"] / plain_s, 3)
    result = {"runs": runs, "grad_pass_overhead_ratio": ratio, "plain_grad_loop_s": plain_s,
              "plain_grad_loop_runs_s": [round(t, 2) for t in plain_times],
              "grad_batch_size": cfg.backend.grad_batch_size, "threads": args.threads,
              "samples": args.samples, "seq_len": args.seq_len, "eval_windows": args.eval_windows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(runs, plain_s)
    log.info("gradient-pass overhead ratio (ray, most workers, vs plain loop): %s; wrote %s", ratio, args.out)


if __name__ == "__main__":
    main()
