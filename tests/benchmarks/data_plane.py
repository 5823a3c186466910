"""Benchmark: where a distributed run's memory goes, before and after the data plane moved to the ranks.

For each shape (seeded random LLaMA shapes of ``scaling.py``) and worker count, GBLM on ``backend: ray`` with
4 x 128 calibration tokens and no evaluation is run once per tree, interleaved (tree A, tree B, next cell),
each as its own driver process. Per run: the coordinator's own peak RSS (``getrusage(RUSAGE_SELF)`` of the
driver process, measured by a wrapper around the CLI so both trees are measured the same way), every worker's
peak RSS (``report.json``), the coordinator's load phase, the workers' start-up (their loading), the gradient
and block pass seconds. Prints a table and writes JSON.

    python tests/benchmarks/data_plane.py --before ../before --out bench-out/data-plane.json

``--before`` is a checkout of the earlier tree (e.g. ``git worktree add ../before d9633ef``), ``--after`` of the
later one (default: this tree); both run with this interpreter (each tree first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HERE))

from tests.benchmarks.scaling import SHAPES  # noqa: E402

log = logging.getLogger("bench.data_plane")

#: runs the CLI in this process and prints the process's own peak RSS (KiB on Linux) as the last stderr line
WRAPPER = r"""
import resource, sys
import orchestrator
from orchestrator.surfaces.cli import main
print("TREE " + orchestrator.__file__, file=sys.stderr)
rc = main(sys.argv[1:])
print("SELF_MAXRSS_KIB %d" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def overrides(shape: str, workers: int, out: Path) -> list[str]:
    """The run of one cell (what the issue measured: plain GBLM, 4 x 128 tokens, no evaluation; pinned, since
    configs/default.yaml now adds layer reconstruction and the ADMM search)."""
    layers, hidden, heads, kv, inter = SHAPES[shape]
    return [f"model.tiny.{k}={v}" for k, v in dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                                                    intermediate=inter, max_positions=512).items()] + [
        "model.source=tiny", "calibration.source=builtin:python-topics-calibration", "calibration.num_samples=4",
        "calibration.seq_len=128", "pruning.method=gblm", "pruning.reconstruct=none", "pruning.search=none",
        "pruning.gblm.grad_samples=null",
        "backend.kind=ray", f"backend.workers={workers}",
        f"backend.num_threads={max(1, (os.cpu_count() or 1) // workers)}", "backend.activation_checkpointing=false",
        "backend.forward_dtype=float32", "pruning.gblm.grad_dtype=float32", "eval.enabled=false", "eval.speed=false",
        "eval.tasks=[]",
        "output.save_model=true", f"output.dir={out}", "output.overwrite=true"]


def run_cell(tree: Path, shape: str, workers: int, work: Path, extra: tuple[str, ...] = ()) -> dict:
    """One run of ``tree``'s CLI; its measurements. More workers than cores run on a Ray head started for the
    run with that many CPUs (its worker processes inherit the tree's ``PYTHONPATH``), fewer on the CLI's own."""
    out = work / f"{tree.name}-{shape}-w{workers}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", WRAPPER, "-q", "prune", "configs/default.yaml", *overrides(shape, workers, out),
           *extra]
    head = workers > (os.cpu_count() or 1)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    if head:
        subprocess.run([ray_bin, "start", "--head", f"--num-cpus={workers}", "--include-dashboard=false",
                        "--disable-usage-stats"], cwd=tree, env=env, check=True, capture_output=True, timeout=300)
        cmd.append("backend.address=auto")
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    finally:
        if head:
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=300)
    lines = proc.stderr.splitlines()
    used = next((ln.split(" ", 1)[1] for ln in lines if ln.startswith("TREE ")), "?")
    if not used.startswith(str(tree)):
        raise RuntimeError(f"{tree}: the run imported {used}")
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {shape} x{workers} failed:\n" + "\n".join(lines[-30:]))
    maxrss = next(int(ln.split()[1]) for ln in reversed(lines) if ln.startswith("SELF_MAXRSS_KIB "))
    report = json.loads((out / "report.json").read_text())
    phases = report["phases"]
    mem = report["memory_per_worker"]
    return {
        "tree": str(tree), "shape": shape, "workers": workers,
        "parameters": report["model"]["parameters"],
        "coordinator_peak_rss_bytes": maxrss * 1024,
        "worker_peak_rss_bytes": [m["peak_rss_bytes"] for m in mem],
        "worker_peak_rss_bytes_by_phase": [m.get("peak_rss_bytes_by_phase") for m in mem],
        "worker_peak_allocated_bytes_by_phase": [m.get("peak_allocated_bytes_by_phase") for m in mem],
        "worker_load_read_bytes": [m.get("load_read_bytes") for m in mem],
        "coordinator_load_s": phases.get("load"),
        "startup_s": phases.get("prune.startup"),
        "gradient_pass_s": phases.get("prune.gradient_pass"),
        "block_pass_s": phases.get("prune.block_pass"),
        "save_s": phases.get("save"),
        "prune_s": phases.get("prune"),
        "pruned_ppl": report["metrics"].get("pruned_ppl"),
    }


def table(rows: list[dict], labels: dict[str, str]) -> str:
    """Markdown table, one line per run."""
    out = ["| shape | params | W | tree | coordinator peak RSS GB | max worker peak RSS GB | coordinator load s | "
           "workers' start-up s | gradient pass s | block pass s | save s |", "|" + "---|" * 11]
    for r in rows:
        out.append(f"| {r['shape']} | {r['parameters'] / 1e6:.0f}M | {r['workers']} | {labels[r['tree']]} | "
                   f"{r['coordinator_peak_rss_bytes'] / 1e9:.2f} | {max(r['worker_peak_rss_bytes']) / 1e9:.2f} | "
                   f"{r['coordinator_load_s']:.1f} | {r['startup_s']:.1f} | {r['gradient_pass_s']:.1f} | "
                   f"{r['block_pass_s']:.1f} | {r['save_s']:.1f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the earlier tree")
    ap.add_argument("--after", type=Path, default=HERE, help="checkout of the later tree (default: this one)")
    ap.add_argument("--shapes", default="s300m,s1b")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--after-only", default="", help="cells run on this tree only, e.g. s1b:4 (the earlier tree's "
                                                      "coordinator would not fit beside 4 workers here)")
    ap.add_argument("extra", nargs="*", help="KEY=VALUE overrides after the pinned ones (pruning.reconstruct=layer)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    trees = {args.before.resolve(): "before", args.after.resolve(): "after"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-plane-") as tmp:
        for shape in args.shapes.split(","):
            for w in (int(x) for x in args.workers.split(",")):
                for tree in trees:
                    if trees[tree] == "before" and f"{shape}:{w}" in args.after_only.split(","):
                        continue
                    log.info("%s %s x%d", trees[tree], shape, w)
                    rows.append(run_cell(tree, shape, w, Path(tmp), tuple(args.extra)))
                    log.info("  %s", {k: v for k, v in rows[-1].items() if k != "tree"})
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"rows": rows, "labels": {str(k): v for k, v in trees.items()}},
                                                   indent=2))
    text = table(rows, {str(k): v for k, v in trees.items()})
    print(text)
    by = {(r["shape"], r["workers"], trees[Path(r["tree"])]): r for r in rows}
    summary = {}
    for (shape, w, label), r in by.items():
        if label == "after" and (shape, w, "before") in by:
            b = by[(shape, w, "before")]
            summary[f"{shape}-w{w}"] = {
                "coordinator_rss_ratio": r["coordinator_peak_rss_bytes"] / b["coordinator_peak_rss_bytes"],
                "max_worker_rss_ratio": max(r["worker_peak_rss_bytes"]) / max(b["worker_peak_rss_bytes"]),
                "block_pass_ratio": r["block_pass_s"] / b["block_pass_s"],
            }
    args.out.write_text(json.dumps({"rows": rows, "labels": {str(k): v for k, v in trees.items()},
                                    "summary": summary, "table": text}, indent=2))
    print(json.dumps(summary, indent=1))
    if summary:
        print("median block-pass ratio after/before:",
              round(statistics.median(v["block_pass_ratio"] for v in summary.values()), 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
