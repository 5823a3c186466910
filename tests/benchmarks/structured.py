"""Structured pruning (SAAP) benchmark under the SmolLM2 protocol (BENCHMARK.md).

Scores the dense SmolLM2-135M once (per-sequence gradients over 32 x 512 calibration
tokens, K mini-batches), then prunes copies of it at each target with each allocation,
optionally recovers them with LoRA group fine-tuning, and reports perplexity on the
first 40 x 512 Debian-handbook windows plus CPU speed measured side by side with the
dense model (interleaved repeats, 2 torch threads).

Usage::

    python tests/benchmarks/structured.py --out structured.json
    python tests/benchmarks/structured.py --targets 0.2 --allocations uniform,adaptive --recovery none
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from orchestrator.config import load_config
from orchestrator.data import calibration_windows, first_windows, load_texts, tokenize_corpus
from orchestrator.evaluate import perplexity
from orchestrator.modeling import load_model, load_tokenizer, materialize
from orchestrator.speed import matmul_flops_per_token as flops_per_token
from orchestrator.structured.groups import decoder_params, module_groups
from orchestrator.structured.run import Importance, apply_pruning, compute_importance, protected_blocks

log = logging.getLogger("structured-bench")
DATA = Path("/work/shared/data")


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)  # a prompt's prefill needs only the last logits (as generate)
    return time.perf_counter() - t


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new: int) -> float:
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == prompt.shape[1] + new
    return time.perf_counter() - t


def measure_speed(models: dict[str, torch.nn.Module], prompt512: torch.Tensor, repeats: int,
                  new: int = 128) -> dict[str, dict[str, float]]:
    """Interleaved repeats over all models (robust to drifting load); medians in tokens/s."""
    pre: dict[str, list[float]] = {k: [] for k in models}
    dec: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        prefill_seconds(m, prompt512[:, :64])
        decode_seconds(m, prompt512[:, :16], 4)
    for r in range(repeats):
        for k, m in models.items():
            pre[k].append(prompt512.shape[1] / prefill_seconds(m, prompt512))
            dec[k].append(new / decode_seconds(m, prompt512[:, :16], new))
        log.info("speed repeat %d done", r)
    return {k: {"prefill_tps": statistics.median(pre[k]), "decode_tps": statistics.median(dec[k])} for k in models}


def get_importance(dense, calib, s, cache: Path | None, refresh: bool = False) -> Importance:
    key = f"{'+'.join(s.estimators)}-{s.aggregation}-k{s.minibatches}-n{calib.shape[0]}x{calib.shape[1]}"
    first, last = protected_blocks(s, dense.config.num_hidden_layers)
    if cache is not None:
        f = cache / f"importance-{key}.pt"
        if f.is_file() and not refresh:
            d = torch.load(f, weights_only=True)
            log.info("importance from cache %s", f)
            if "means" not in d:
                log.warning("cache predates the shift-free stability indicator: cv values are stale")
            return Importance(module_groups(dense, first, last), d["fused"], d["sigmas"], d["cv"], d.get("means", {}),
                              d["seconds"])
    imp = compute_importance(dense, calib, s, progress=True)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"fused": imp.fused, "sigmas": imp.sigmas, "cv": imp.cv, "means": imp.means,
                    "seconds": imp.seconds},
                   cache / f"importance-{key}.pt")
    return imp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="structured-bench.json")
    ap.add_argument("--targets", default="0.2,0.5")
    ap.add_argument("--allocations", default="uniform,adaptive",
                    help="comma list; adaptive:INDICATOR (stability, importance, hybrid) picks the indicator")
    ap.add_argument("--recovery", default="0.2", help="targets whose rows are also recovered: none, all or a list")
    ap.add_argument("--recovery-steps", type=int, default=16, help="LoRA steps per group of blocks")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--eval-dtype", default="float32", help="bfloat16: autocast evaluation (quick comparisons)")
    ap.add_argument("--ppl-from", default=None,
                    help="earlier result JSON: reuse its perplexities for identical rows (same importance cache)")
    ap.add_argument("--refresh-importance", action="store_true", help="recompute (and re-cache) importance")
    ap.add_argument("--repeats", type=int, default=3, help="speed repeats (0: no speed)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "rayprune" / "structured-bench"))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides (structured.indicator=...)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_config(None, [
        "model.source=smollm2-135m", f"calibration.source={DATA / 'calib-python-docs.parquet'}",
        f"calibration.num_samples={args.calib_n}", "calibration.seq_len=512",
        f"structured.recovery.steps_per_group={args.recovery_steps}", *args.set,
    ])
    path = materialize(cfg.model)
    dense = load_model(path, cfg.model)
    tok = load_tokenizer(path, cfg.model)
    calib = calibration_windows(cfg, path, tok, dense)  # (32, 512)
    evals = first_windows(tokenize_corpus(load_texts(str(DATA / "eval-debian-handbook.parquet")), tok),
                          512, args.eval_n, "eval")  # (40, 512)
    known: dict[tuple, float] = {}
    if args.ppl_from:
        old = json.loads(Path(args.ppl_from).read_text())
        known[("dense",)] = old["dense"]["ppl"]
        known.update({(r["target"], r["allocation"], r["recovered"]): r["ppl"] for r in old["rows"]})

    def ppl(m, key: tuple) -> float:
        if key in known:
            log.info("perplexity of %s reused from %s", key, args.ppl_from)
            return known[key]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.eval_dtype == "bfloat16"):
            return perplexity(m, evals)

    imp = get_importance(dense, calib, cfg.structured, Path(args.cache) if args.cache else None,
                         args.refresh_importance)
    result = {"dense": {"ppl": ppl(dense, ("dense",)), "params": decoder_params(dense),
                        "flops_per_token": flops_per_token(dense)},
              "rows": [], "sigmas": imp.sigmas, "importance_seconds": imp.seconds,
              "config": cfg.to_dict()["structured"]}
    log.info("dense ppl %.3f", result["dense"]["ppl"])
    models = {"dense": dense}
    rec_targets = {"none": [], "all": None}.get(args.recovery, None)
    if args.recovery not in ("none", "all"):
        rec_targets = [float(x) for x in args.recovery.split(",")]
    for target in [float(x) for x in args.targets.split(",")]:
        for alloc in args.allocations.split(","):
            s = copy.deepcopy(cfg.structured)
            s.target, s.allocation = target, alloc.split(":")[0]
            if ":" in alloc:  # adaptive:stability picks the indicator
                s.indicator = alloc.split(":")[1]
            model = copy.deepcopy(dense)
            rep = apply_pruning(model, imp, s)
            name = f"{target}-{alloc}"
            row = {"target": target, "allocation": alloc, "recovered": False, "params": decoder_params(model),
                   "removed_fraction": rep["removed_fraction"], "flops_per_token": flops_per_token(model),
                   "ppl": ppl(model, (target, alloc, False)), "layer_sizes": rep["layer_sizes"]}
            log.info("%s: ppl %.3f, removed %.4f", name, row["ppl"], row["removed_fraction"])
            result["rows"].append(row)
            models[name] = model
            if rec_targets is None or target in rec_targets:
                from orchestrator.structured.recovery import recover

                rmodel, rrep = recover(copy.deepcopy(model), calib, cfg.structured.recovery, progress=True)
                rrow = {**row, "recovered": True, "ppl": ppl(rmodel, (target, alloc, True)),
                        "recovery_seconds": rrep["seconds"], "recovery_steps": rrep["steps"]}
                log.info("%s recovered: ppl %.3f", name, rrow["ppl"])
                result["rows"].append(rrow)
            Path(args.out).write_text(json.dumps(result, indent=1))
    if args.repeats > 0:
        speed = measure_speed(models, evals[:1], args.repeats)
        result["dense"].update(speed["dense"])
        for row in result["rows"]:  # recovered rows have the same shapes as their unrecovered twin
            row.update(speed[f"{row['target']}-{row['allocation']}"])
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    d = result["dense"]
    print(f"{'row':<26}{'params':>12}{'GFLOP/tok':>10}{'ppl':>9}{'prefill t/s':>13}{'decode t/s':>12}{'x pre':>7}"
          f"{'x dec':>7}")
    def line(name, r):
        nan = float("nan")
        pre, dec = r.get("prefill_tps", nan), r.get("decode_tps", nan)
        print(f"{name:<26}{r['params']:>12}{r['flops_per_token'] / 1e9:>10.3f}{r['ppl']:>9.2f}{pre:>13.1f}"
              f"{dec:>12.1f}{pre / d.get('prefill_tps', nan):>7.2f}{dec / d.get('decode_tps', nan):>7.2f}")
    line("dense", d)
    for r in result["rows"]:
        line(f"{r['target']:.0%} {r['allocation']}{' +LoRA' if r['recovered'] else ''}", r)


if __name__ == "__main__":
    main()
