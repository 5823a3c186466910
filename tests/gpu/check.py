"""The GPU suite: the distributed engine on a lent GPU against the CPU engine, row by row.

Each row runs one capability on the GPU and checks it against a CPU reference or the plan; it is written
to the JSON file the moment it finishes (a timeout keeps every finished row), and it is ``passed`` only
when it ran and met its target: a model or a feature that is not there is ``skipped`` and fails the suite
unless ``--allow-skip`` names it. Rows (``--list`` prints them):

* ``prune-<method>``: GBLM, Wanda and SparseGPT with one ZeRO-3 worker on the GPU (NCCL, bf16 forwards)
  against the local engine on the CPU: masks >= 99.9% equal, perplexity within 1% (an evaluation actor on
  the GPU), every worker's parameters, statistics and masks on ``cuda``.
* ``bf16-params-<method>``: the same with ``model.dtype: bfloat16`` (what 13B/70B configs use).
* ``checkpointing``, ``offload-stats``: GBLM with activation checkpointing / statistics in pinned host
  memory: the masks of ``prune-gblm``; blocks recomputed / statistics on the CPU.
* ``eval-shard``: perplexity from a ZeRO-3 evaluation group on the GPU against the CPU's.
* ``plan-memory``: a 4-block random model's measured allocator peaks per phase against the plan.
* ``stats-fp32``: activation statistics under CUDA bf16 autocast and TF32 against fp64 (<= 1e-5).
* ``sparsegpt-syncs``: host synchronisations of one SparseGPT call (a handful, not one per column).
* ``two-ranks-one-gpu``: two ZeRO-3 ranks sharing the GPU (really partitioned), or NCCL's refusal.
* ``saap-importance``, ``saap-ray-checkpointed``: SAAP's importance on the GPU against the CPU.

    python tests/gpu/check.py --out gpu-check.json [--rows prune-gblm,eval-shard] [--rerun-failed]

Exit status 0 when every row passed, 1 otherwise, 77 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.gpu import rows as R  # noqa: E402

log = logging.getLogger("gpu-check")


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    """The JSON file as it stands (written to a temp file, then renamed: never half a file)."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str) + "\n")
    tmp.replace(out)


def run_row(name: str, ctx: R.Context) -> dict:
    """One row: its result with ``status`` (passed, failed, skipped) and ``seconds``."""
    t0 = time.perf_counter()
    try:
        row = R.ROWS[name](ctx)
        row.setdefault("status", "passed" if row.pop("ok") else "failed")
    except R.Skip as exc:
        row = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failed row is a result; the others still run
        log.exception("%s failed", name)
        row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "trace": traceback.format_exc(limit=6)[-2000:]}
    return {"row": name, **row, "seconds": round(time.perf_counter() - t0, 1)}


def run_rows(names: list[str], out: Path, meta: dict, kept: list[dict], ctx: R.Context) -> list[dict]:
    """Run ``names`` after the ``kept`` rows, rewriting ``out`` after each; returns every row."""
    rows = list(kept)
    write(out, meta, rows)
    try:
        for name in names:
            log.info("row %s", name)
            rows.append(run_row(name, ctx))
            write(out, meta, rows)
            log.info("row %s: %s", name, rows[-1]["status"])
    finally:
        ctx.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--rerun-failed", action="store_true",
                    help="run only the rows of --out that did not pass, keeping the passed ones")
    ap.add_argument("--allow-skip", default="", help="comma-separated rows that may be skipped")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--cpu", action="store_true",
                    help="dry run on the CPU: CPU actors on gloo, the CUDA-only rows skipped (checks the suite runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list:
        print("\n".join(R.ROWS))  # noqa: T201 - the list is the output
        return 0
    if not args.cpu and not torch.cuda.is_available():
        log.warning("no CUDA device: the GPU suite is skipped")
        return 77
    out = Path(args.out)
    names = [n for n in (args.rows.split(",") if args.rows else R.ROWS) if n]
    unknown = [n for n in names if n not in R.ROWS]
    if unknown:
        ap.error(f"--rows: unknown row(s) {unknown}; --list prints them")
    kept: list[dict] = []
    if args.rerun_failed and out.is_file():
        previous = json.loads(out.read_text())["rows"]
        kept = [r for r in previous if r["status"] == "passed"]
        names = [n for n in names if n not in {r["row"] for r in kept}]
    meta = {"gpu": "none (CPU dry run)" if args.cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_gpus=0 if args.cpu else 1, num_cpus=min(8, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True)
    try:
        rows = run_rows(names, out, meta, kept, R.Context(gpu=not args.cpu))
    finally:
        if started:
            ray.shutdown()
    allowed = set(filter(None, args.allow_skip.split(",")))
    log.info("%-24s %-8s %7s  %s", "row", "status", "seconds", "detail")
    for r in rows:
        detail = r.get("error") or r.get("reason") or {k: v for k, v in r.items() if k in R.SUMMARY}
        log.info("%-24s %-8s %7s  %s", r["row"], r["status"], r.get("seconds", ""), detail)
    good = all(r["status"] == "passed" or (r["status"] == "skipped" and r["row"] in allowed) for r in rows)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
