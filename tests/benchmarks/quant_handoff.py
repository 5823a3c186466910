"""Quantization hand-off benchmark: a rayprune-pruned checkpoint quantized by llm-compressor with the recipe
``rayprune export`` writes, against the dense model quantized the same way and the pruned model alone.

The BENCHMARK.md protocol (SmolLM2-135M, 32 x 512 calibration windows of the Python docs, perplexity on the
first 40 x 512 windows of the Debian handbook). The model is pruned once with the main job's method
(``configs/default.yaml``, local backend); every row is then measured by ``peer_quantize.py`` in
llm-compressor's environment (``make peer-venv``), the same perplexity code for all rows (the quantized rows
run llm-compressor's quantized forward), plus the fraction of zeros of the decoder linears' effective
(quantized) weights. Prints a table and writes JSON.

    python tests/benchmarks/quant_handoff.py --out bench-out/handoff.json [--schemes W8A8,W4A16-GPTQ] [--run DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from pathlib import Path

import torch

from orchestrator import build_config, prune
from orchestrator.coordinator import eval_windows
from orchestrator.inputs.data import calibration_windows
from orchestrator.inputs.models import load_model, load_tokenizer, materialize
from orchestrator.outputs import handoff

log = logging.getLogger("bench.handoff")
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"


def peer(args: argparse.Namespace, model: str, eval_ids: Path, recipe: Path | None, calib: Path | None) -> dict:
    """One ``peer_quantize.py`` run; its JSON line."""
    cmd = [str(args.peer_python), str(ROOT / "tests" / "benchmarks" / "peer_quantize.py"), "--model", model,
           "--eval", str(eval_ids), "--threads", str(args.threads)]
    cmd += ["--recipe", str(recipe)] if recipe else []
    cmd += ["--calib", str(calib)] if calib else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"peer_quantize failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--schemes", default="W8A8,W4A16,W4A16-GPTQ")
    ap.add_argument("--run", help="a pruned run directory to use (default: prune one into bench-out/handoff-run)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--peer-python", default=str(PEER_PYTHON))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size (SmolLM2's 576 rules out 128)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = build_config(ROOT / "configs" / "default.yaml", overrides={
        "calibration.source": f"{args.data}/calib-python-docs.parquet",
        "eval.source": f"{args.data}/eval-debian-handbook.parquet", "eval.enabled": False, "eval.tasks": [],
        "eval.speed": False, "backend.kind": "local", "output.dir": str(ROOT / "bench-out" / "handoff-run"),
        "output.overwrite": True})
    run_dir = Path(args.run) if args.run else prune(cfg, progress=False).run_dir
    dense_path = materialize(cfg.model)
    tok = load_tokenizer(dense_path, cfg.model)
    dense = load_model(dense_path, cfg.model)
    ev = build_config(cfg, overrides={"eval.enabled": True})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        eval_ids, calib_ids = Path(tmp) / "eval.pt", Path(tmp) / "calib.pt"
        torch.save(eval_windows(ev, tok, dense), eval_ids)
        torch.save(calibration_windows(cfg, dense_path, tok, dense), calib_ids)
        del dense
        for label, model in (("dense", dense_path), ("pruned", str(run_dir / "model"))):
            for scheme in ["none", *filter(None, args.schemes.split(","))]:
                recipe = None
                if scheme != "none":
                    recipe = Path(tmp) / f"recipe-{scheme}.yaml"
                    handoff.write(run_dir, scheme, recipe, args.group_size)
                calib = calib_ids if scheme != "none" and handoff.needs_calibration(scheme) else None
                try:
                    row = {"model": label, "scheme": scheme, **peer(args, model, eval_ids, recipe, calib)}
                except RuntimeError as exc:  # a failed row is a result; the others still run
                    row = {"model": label, "scheme": scheme, "error": str(exc)}
                rows.append(row)
                log.info("%s", row)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"run": str(run_dir), "rows": rows}, indent=2) + "\n")
    base = {r["model"]: r["ppl"] for r in rows if r["scheme"] == "none" and "ppl" in r}
    log.info("%-7s %-11s %9s %12s %14s %10s", "model", "scheme", "ppl", "vs pruned", "linear zeros", "quant s")
    for r in rows:
        if "error" in r:
            log.info("%-7s %-11s %s", r["model"], r["scheme"], r["error"])
            continue
        log.info("%-7s %-11s %9.3f %+11.1f%% %13.2f%% %10.1f", r["model"], r["scheme"], r["ppl"],
                 100 * (r["ppl"] / base["pruned"] - 1), 100 * r["linear_zeros"], r["quantize_s"])


if __name__ == "__main__":
    main()
