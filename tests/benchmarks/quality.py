"""Quality benchmark (BENCHMARK.md protocol): methods x patterns on SmolLM2-135M.

Prints a table and writes JSON to ``--out``:
``{"dense_ppl", "dense_debian_cloze_acc", "rows": [{"method", "pattern", "options", "sparsity", "ppl",
"debian_cloze_acc", "prune_s", "phases"}]}`` (cloze accuracy: the 200 examples of the builtin
``debian_cloze`` task, log-likelihood, unnormalised).

Rows are ``--methods`` x ``--patterns``, or the ``--rows`` given as
``METHOD/PATTERN[/KEY=VALUE,KEY=VALUE...]`` (pruning keys, e.g. ``reconstruct=layer``, or ``backend.*`` keys); the
gradient pass is shared by every row with the same gradient settings.

Example:
    python tests/benchmarks/quality.py --out bench-out/quality.json --keep bench-out/ckpt
    python tests/benchmarks/quality.py --out q.json --rows wanda/unstructured wanda/2:4/reconstruct=layer
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from orchestrator.coordinator import eval_windows, reached_sparsity
from orchestrator.engine.device import Placement, native_bf16
from orchestrator.engine.local import block_sequential, method_gradients, pruned_weight_names
from orchestrator.evaluation.perplexity import perplexity
from orchestrator.evaluation.zeroshot import aggregate, load_task, score_examples, task_path
from orchestrator.inputs.data import calibration_windows
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import load_model, load_tokenizer, materialize
from orchestrator.pruning.methods import gradient_kinds

log = logging.getLogger("bench.quality")
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER = "llmc-"  # row methods run by llm-compressor in its own process
ALPS = "alps"  # the ALPS peer row, run from the checkout given by --alps in its own process


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output file")
    ap.add_argument("--keep", help="save each pruned checkpoint as DIR/<method>-<pattern>")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,gblm")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--rows", nargs="+", default=None, metavar="METHOD/PATTERN[/K=V,...]",
                    help="explicit rows instead of --methods x --patterns")
    ap.add_argument("--data", default=str(DATA), help="folder with the two benchmark parquet files")
    ap.add_argument("--peer-python", default=str(PEER_PYTHON),
                    help="Python of the llm-compressor environment (rows `llmc-wanda/...`, `llmc-sparsegpt/...`)")
    ap.add_argument("--alps", default=None, metavar="DIR",
                    help="a checkout of github.com/mazumder-lab/ALPS (rows `alps/...`; skipped without it)")
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
    cloze = load_task(task_path("debian_cloze"))

    def cloze_acc(model: torch.nn.Module) -> float:
        return aggregate(score_examples(model, tokenizer, cloze))["acc"]

    dense_acc = cloze_acc(dense)
    log.info("dense ppl %.3f (context %d), debian_cloze acc %.3f", dense_ppl, cfg.eval.seq_len, dense_acc)
    rows = []
    grad_cache: dict[tuple, tuple[dict, float]] = {}  # one gradient pass per gradient setting, shared by rows
    for method, pattern, options in row_specs(args):
        if method.startswith(PEER) or method == ALPS:
            row = peer_row(args, method, pattern, options, path, calib, dense)
            if "skipped" not in row:
                model = row.pop("model")
                row.update(ppl=perplexity(model, windows, progress=False), debian_cloze_acc=cloze_acc(model))
            rows.append(row)
            log.info("%s", row)
            write_result(args.out, dense_ppl, dense_acc, cfg.eval.seq_len, rows)
            continue
        run = load_config(None, base + args.overrides + [f"pruning.method={method}", f"pruning.pattern={pattern}"]
                          + [f"{k}={v}" if k.startswith("backend.") else f"pruning.{k}={v}"
                             for k, v in options.items()])
        run = run.with_compute_dtypes(native_bf16("cpu"))  # `auto` as a run on this machine resolves it
        kinds = gradient_kinds(method, run.pruning.gblm.norm)
        grads, grad_s = None, 0.0
        if kinds:
            g_cfg = run.pruning.gblm
            key = (kinds, g_cfg.grad_scale, g_cfg.grad_dtype, g_cfg.grad_samples)
            if key not in grad_cache:
                t0 = time.perf_counter()
                g = method_gradients(copy.deepcopy(dense), calib, run.pruning, progress=False)
                grad_cache[key] = (g, time.perf_counter() - t0)
            grads, grad_s = grad_cache[key]
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        outcome = block_sequential(model, calib, run.pruning, grads, Placement.of("cpu", run.backend.forward_dtype),
                                   progress=False)
        block_s = time.perf_counter() - t0
        outcome.phases = {**({"gradient_pass": grad_s} if kinds else {}), "block_pass": block_s}
        prune_s = grad_s + block_s if kinds else block_s
        frac, _, _ = reached_sparsity(model, pruned_weight_names(model))
        ppl = perplexity(model, windows, progress=False)
        row = {"method": method, "pattern": pattern, "options": options, "sparsity": round(frac, 6), "ppl": ppl,
               "debian_cloze_acc": cloze_acc(model), "compute_dtypes": run.compute_dtypes(),
               "prune_s": round(prune_s, 2), "phases": {k: round(v, 2) for k, v in outcome.phases.items()}}
        rows.append(row)
        log.info("%s", row)
        write_result(args.out, dense_ppl, dense_acc, cfg.eval.seq_len, rows)  # after every row: nothing lost
        if args.keep:
            suffix = "".join(f"-{k}_{v}" for k, v in options.items())
            target = Path(args.keep) / f"{method}-{pattern.replace(':', '_')}{suffix}"
            model.save_pretrained(target, safe_serialization=True)
            tokenizer.save_pretrained(target)
        del model
    write_result(args.out, dense_ppl, dense_acc, cfg.eval.seq_len, rows)
    header = (f"{'method':<10} {'pattern':<13} {'options':<40} {'sparsity':>8} {'ppl@512':>9} {'cloze':>6} "
              f"{'prune s':>8}")
    dense_line = f"{'dense':<10} {'-':<13} {'-':<40} {0:>8.4f} {dense_ppl:>9.3f} {dense_acc:>6.3f} {'-':>8}"
    lines = [header, "-" * len(header), dense_line]
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        if "skipped" in r:
            lines.append(f"{r['method']:<10} {r['pattern']:<13} {opts:<40} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['method']:<10} {r['pattern']:<13} {opts:<40} {r['sparsity']:>8.4f} {r['ppl']:>9.3f} "
                     f"{r['debian_cloze_acc']:>6.3f} {r['prune_s']:>8.1f}")
    print("\n".join(lines))  # noqa: T201 - the table is the script's output


def write_result(out: str, dense_ppl: float, dense_acc: float, seq_len: int, rows: list[dict]) -> None:
    """Write the JSON (atomically) with the rows measured so far."""
    result = {"dense_ppl": dense_ppl, "dense_debian_cloze_acc": dense_acc, "eval_seq_len": seq_len, "rows": rows}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def peer_row(args: argparse.Namespace, method: str, pattern: str, options: dict[str, str], model_path: str,
             calib: torch.Tensor, dense: torch.nn.Module) -> dict:
    """One peer row (llm-compressor, or ALPS): prune in the peer's own process, load its weights into a copy of
    ``dense``.

    Options: ``sparsity=F`` (unstructured) and ``allocation=owl`` (llm-compressor's OWL profile).
    The row says ``skipped`` when the peer environment (or the ALPS checkout) is missing or its run fails.
    """
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    row: dict = {"method": method, "pattern": pattern, "options": options}
    sparsity = float(options.get("sparsity", 0.5))
    common = ["--model", model_path, "--pattern", pattern, "--sparsity", str(sparsity), "--threads", str(args.threads)]
    if method == ALPS:
        if not args.alps:
            return {**row, "skipped": "no ALPS checkout given (--alps DIR)"}
        script = str(Path(__file__).with_name("peer_alps.py"))
        peer, phase, cmd = "ALPS", "alps", [sys.executable, script, "--alps", args.alps, *common]
    elif not Path(args.peer_python).exists():
        return {**row, "skipped": f"no llm-compressor environment at {args.peer_python} (make peer-venv)"}
    else:
        script = str(Path(__file__).with_name("peer_llmcompressor.py"))
        peer, phase, cmd = "llm-compressor", "llmcompressor", [args.peer_python, script, "--method", method[len(PEER):],
                                                               *common]
        if options.get("allocation") == "owl":
            cmd.append("--owl")
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(calib, f"{tmp}/calib.pt")
        cmd += ["--calib", f"{tmp}/calib.pt", "--out", f"{tmp}/w.safetensors"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            return {**row, "skipped": f"{peer} failed: {proc.stderr.strip().splitlines()[-1:]}"}
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        weights = load_file(f"{tmp}/w.safetensors")
    model = copy.deepcopy(dense)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    frac, _, _ = reached_sparsity(model, pruned_weight_names(model))
    return {**row, "sparsity": round(frac, 6), "prune_s": round(info["prune_s"], 2),
            "phases": {phase: round(info["prune_s"], 2)}, "peer_version": info["version"], "model": model}


def row_specs(args: argparse.Namespace) -> list[tuple[str, str, dict[str, str]]]:
    """``(method, pattern, pruning options)`` of every row to run."""
    if not args.rows:
        return [(m, p, {}) for m in args.methods.split(",") for p in args.patterns.split(",")]
    specs = []
    for spec in args.rows:
        method, pattern, *opts = spec.split("/")
        options = dict(kv.split("=", 1) for kv in ",".join(opts).split(",") if kv)
        specs.append((method, pattern, options))
    return specs


if __name__ == "__main__":
    main()
