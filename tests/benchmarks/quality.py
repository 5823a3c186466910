"""Quality benchmark (BENCHMARK.md protocol): methods x patterns on SmolLM2-135M.

Prints a table and writes JSON to ``--out``:
``{"dense_ppl", "rows": [{"method", "pattern", "sparsity", "ppl", "prune_s", "phases"}]}``.

Example:
    python tests/benchmarks/quality.py --out bench-out/quality.json --keep bench-out/ckpt
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from orchestrator.coordinator import eval_windows, reached_sparsity
from orchestrator.engine.device import Placement
from orchestrator.engine.local import block_sequential, gradient_pass, pruned_weight_names
from orchestrator.evaluation.perplexity import perplexity
from orchestrator.inputs.data import calibration_windows
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import load_model, load_tokenizer, materialize
from orchestrator.pruning.methods import gradient_kinds

log = logging.getLogger("bench.quality")
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output file")
    ap.add_argument("--keep", help="save each pruned checkpoint as DIR/<method>-<pattern>")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,gblm")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--data", default=str(DATA), help="folder with the two benchmark parquet files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*",
                    help="extra KEY=VALUE config overrides (e.g. backend.forward_dtype=bfloat16)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    base = [
        "model.source=smollm2-135m",
        f"calibration.source={args.data}/calib-python-docs.parquet",
        "calibration.num_samples=32", "calibration.seq_len=512", "calibration.seed=0",
        f"eval.source={args.data}/eval-debian-handbook.parquet", "eval.num_windows=40", "eval.seq_len=512",
        "backend.kind=local",
    ]
    cfg = load_config(None, base + args.overrides)
    path = materialize(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    dense = load_model(path, cfg.model)
    calib = calibration_windows(cfg, path, tokenizer, dense)
    windows = eval_windows(cfg, tokenizer, dense)
    dense_ppl = perplexity(dense, windows, progress=False)
    log.info("dense ppl %.3f (context %d)", dense_ppl, cfg.eval.seq_len)
    rows = []
    for method in args.methods.split(","):
        grads, grad_s = None, 0.0  # one gradient pass per method, shared by its patterns
        for pattern in args.patterns.split(","):
            run = load_config(None, base + args.overrides + [f"pruning.method={method}", f"pruning.pattern={pattern}"])
            kinds = gradient_kinds(method, run.pruning.gblm.norm)
            if kinds and grads is None:
                t0 = time.perf_counter()
                grads = gradient_pass(copy.deepcopy(dense), calib, kinds, run.pruning.gblm.grad_scale, progress=False)
                grad_s = time.perf_counter() - t0
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            outcome = block_sequential(model, calib, run.pruning, grads, Placement.of("cpu", run.backend.forward_dtype),
                                       progress=False)
            block_s = time.perf_counter() - t0
            outcome.phases = {**({"gradient_pass": grad_s} if kinds else {}), "block_pass": block_s}
            prune_s = grad_s + block_s if kinds else block_s
            frac, _, _ = reached_sparsity(model, pruned_weight_names(model))
            ppl = perplexity(model, windows, progress=False)
            row = {"method": method, "pattern": pattern, "sparsity": round(frac, 6), "ppl": ppl,
                   "prune_s": round(prune_s, 2), "phases": {k: round(v, 2) for k, v in outcome.phases.items()}}
            rows.append(row)
            log.info("%s", row)
            if args.keep:
                target = Path(args.keep) / f"{method}-{pattern.replace(':', '_')}"
                model.save_pretrained(target, safe_serialization=True)
                tokenizer.save_pretrained(target)
            del model
    result = {"dense_ppl": dense_ppl, "eval_seq_len": cfg.eval.seq_len, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    header = f"{'method':<10} {'pattern':<13} {'sparsity':>8} {'ppl@512':>9} {'prune s':>8}"
    lines = [header, "-" * len(header), f"{'dense':<10} {'-':<13} {0:>8.4f} {dense_ppl:>9.3f} {'-':>8}"]
    for r in rows:
        lines.append(
            f"{r['method']:<10} {r['pattern']:<13} {r['sparsity']:>8.4f} {r['ppl']:>9.3f} {r['prune_s']:>8.1f}"
        )
    print("\n".join(lines))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
