"""Structured pruning (SAAP) benchmark under the SmolLM2 protocol (BENCHMARK.md).

Scores the dense SmolLM2-135M once (per-sequence gradients over 32 x 512 calibration
tokens, K mini-batches), then prunes copies of it at each target with each allocation,
optionally recovers them with LoRA group fine-tuning (windows of the calibration source,
never the evaluation corpus), and reports perplexity on the first 40 x 512 Debian-handbook
windows plus CPU speed measured side by side with the dense model in one run
(:func:`orchestrator.evaluation.speed.compare_speed`: interleaved repeats, medians; prefill of a
512-token prompt and decode of 128 new tokens at batch 1) next to the ideal speedup, dense
matmul FLOPs per token / pruned FLOPs per token. Speed is measured with 2 torch threads (the
protocol's; ``prefill_tps`` / ``decode_tps``) and again with 1 (``*_1t``).

Run it on a quiet machine with OpenMP's default wait policy (threads spin briefly, then sleep).
At batch 1 a decode step is ~210 small matrix-vector products; with ``OMP_WAIT_POLICY=PASSIVE``
every one of them pays a thread wake-up (~70 us) that does not shrink with the matrices: dense
2-thread decode drops from ~26 to ~15 tokens/s and the fixed cost hides part of the speedup
(measured: 0.72x of ideal at 50% instead of 0.87x). Set ``PASSIVE`` only when the machine is
shared and spinning threads get descheduled; the policy in force and the load average are
recorded in the JSON.

Usage::

    python tests/benchmarks/structured.py --out structured.json
    python tests/benchmarks/structured.py --targets 0.2 --allocations uniform,adaptive --recovery none
    # speed again, reusing perplexities and recovered rows of an identical earlier run:
    python tests/benchmarks/structured.py --ppl-from old.json --out new.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path

import torch
from structured_variants import prune_variant  # beside this script (its folder leads sys.path)

from orchestrator.evaluation.perplexity import perplexity
from orchestrator.evaluation.speed import compare_speed
from orchestrator.evaluation.speed import matmul_flops_per_token as flops_per_token
from orchestrator.evaluation.zeroshot import aggregate, load_task, score_examples, task_path
from orchestrator.inputs.data import calibration_windows, first_windows, load_texts, tokenize_corpus
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import load_model, load_tokenizer, materialize
from orchestrator.structured.distill import distill_targets
from orchestrator.structured.groups import decoder_params, module_groups
from orchestrator.structured.recovery import recover, recovery_windows, used_windows
from orchestrator.structured.run import Importance, compute_importance, protected_blocks

log = logging.getLogger("structured-bench")
DATA = Path("/work/shared/data")


def get_importance(dense, calib, s, cache: Path | None, refresh: bool = False, ray_workers: int = 0,
                   cfg=None, path: str | None = None) -> Importance:
    """SAAP's importance of the dense model (cached); ``ray_workers``: from that many ZeRO-3 workers."""
    key = f"{'+'.join(s.estimators)}-{s.aggregation}-k{s.minibatches}-n{calib.shape[0]}x{calib.shape[1]}-raw"
    key += f"-L{dense.config.num_hidden_layers}"
    key += f"-ray{ray_workers}" if ray_workers else ""
    first, last = protected_blocks(s, dense.config.num_hidden_layers)
    if cache is not None:
        f = cache / f"importance-{key}.pt"
        if f.is_file() and not refresh:
            d = torch.load(f, weights_only=True)
            log.info("importance from cache %s", f)
            if "means" not in d:
                log.warning("cache predates the shift-free stability indicator: cv values are stale")
            return Importance(module_groups(dense, first, last), d["fused"], d["sigmas"], d["cv"], d.get("means", {}),
                              d["seconds"], d["raw"])
    if ray_workers:
        from actors.importance import run_ray_importance
        from orchestrator.structured.run import distributed_importance

        cfg.backend.kind, cfg.backend.workers = "ray", ray_workers

        def score(mods, shapes, ids, model_path=None):
            assert model_path is None, "--ray-workers with blocks removed: not supported by this benchmark"
            return run_ray_importance(cfg, path, ids, mods, shapes, progress=True)

        imp, memory = distributed_importance(dense, calib, s, score)
        log.info("importance on ray x%d: %.0f s; per worker %s", ray_workers, imp.seconds,
                 [{k: m[k] for k in ("model_state_bytes", "grad_stat_bytes", "peak_rss_bytes")} for m in memory])
    else:
        imp = compute_importance(dense, calib, s, progress=True)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"fused": imp.fused, "sigmas": imp.sigmas, "cv": imp.cv, "means": imp.means,
                    "seconds": imp.seconds, "raw": imp.raw},
                   cache / f"importance-{key}.pt")
    return imp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="structured-bench.json")
    ap.add_argument("--targets", default="0.2,0.5")
    ap.add_argument("--rows", "--allocations", dest="rows", default="adaptive,global+comp,depth",
                    help="comma list of row variants (structured_variants.py: e.g. adaptive, adaptive:stability, "
                         "global+comp, mlp+global+comp, depth, depth3+global+comp)")
    ap.add_argument("--recovery", default="0.2", help="targets whose rows are also recovered: none, all or a list")
    ap.add_argument("--recover-rows", default=None,
                    help="comma list of the row variants (and `torch-pruning`) recovered, `VARIANT@TARGET` for one "
                         "target only (default: every row)")
    ap.add_argument("--kd-rows", default="",
                    help="row variants also recovered by distillation (loss: kd); `VARIANT@TARGET` for one target")
    ap.add_argument("--no-cloze", action="store_true", help="skip the debian_cloze accuracy of every row")
    ap.add_argument("--recovery-steps", type=int, default=None, help="LoRA optimiser steps (default: the config's)")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--eval-dtype", default="float32", help="bfloat16: autocast evaluation (quick comparisons)")
    ap.add_argument("--ppl-from", default=None,
                    help="earlier result JSON of the same settings: reuse its perplexities and recovered rows "
                         "(same importance cache; recovery is deterministic) and measure speed anew")
    ap.add_argument("--refresh-importance", action="store_true", help="recompute (and re-cache) importance")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved speed repeats (0: no speed)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (importance, recovery, evaluation)")
    ap.add_argument("--speed-threads", default="2,1",
                    help="torch thread counts of the speed runs; the first fills prefill_tps / decode_tps")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "rayprune" / "structured-bench"))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides (structured.indicator=...)")
    ap.add_argument("--ray-workers", type=int, default=0,
                    help="> 0: importance from that many ZeRO-3 workers (backend: ray) instead of one process")
    ap.add_argument("--peer", default="torch-pruning", choices=["torch-pruning", "none"],
                    help="peer rows at each target (skipped, with the reason in the JSON, when not installed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = [f"structured.recovery.steps={args.recovery_steps}"] if args.recovery_steps else []
    cfg = load_config(None, [
        "model.source=smollm2-135m", f"calibration.source={DATA / 'calib-python-docs.parquet'}",
        f"calibration.num_samples={args.calib_n}", "calibration.seq_len=512", *steps, *args.set,
    ])
    path = materialize(cfg.model)
    dense = load_model(path, cfg.model)
    tok = load_tokenizer(path, cfg.model)
    calib = calibration_windows(cfg, path, tok, dense)  # (32, 512)
    evals = first_windows(tokenize_corpus(load_texts(str(DATA / "eval-debian-handbook.parquet")), tok),
                          512, args.eval_n, "eval")  # (40, 512)
    known: dict[tuple, float] = {}
    old_recovered: dict[tuple, dict] = {}
    if args.ppl_from:
        old = json.loads(Path(args.ppl_from).read_text())
        known[("dense",)] = old["dense"]["ppl"]
        known.update({(r["target"], r["allocation"], r.get("loss", "ce") if r["recovered"] else False): r["ppl"]
                      for r in old["rows"]})
        old_recovered = {(r["target"], r["allocation"], r.get("loss", "ce")): r for r in old["rows"]
                         if r["recovered"] and r["recovery"]["steps"] == cfg.structured.recovery.steps}

    def ppl(m, key: tuple) -> float:
        if key in known:
            log.info("perplexity of %s reused from %s", key, args.ppl_from)
            return known[key]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.eval_dtype == "bfloat16"):
            return perplexity(m, evals)

    cloze = None if args.no_cloze else load_task(task_path("debian_cloze"))

    def cloze_acc(m) -> float | None:
        return None if cloze is None else aggregate(score_examples(m, tok, cloze))["acc"]

    cache = Path(args.cache) if args.cache else None
    imp = get_importance(dense, calib, cfg.structured, cache, args.refresh_importance, args.ray_workers, cfg, path)

    def importance(model: torch.nn.Module) -> Importance:
        if model.config.num_hidden_layers == dense.config.num_hidden_layers:
            return imp
        return get_importance(model, calib, cfg.structured, cache, args.refresh_importance)

    result = {"dense": {"ppl": ppl(dense, ("dense",)), "params": decoder_params(dense),
                        "debian_cloze_acc": cloze_acc(dense),
                        "total_params": sum(p.numel() for p in dense.parameters()),
                        "flops_per_token": flops_per_token(dense)},
              "rows": [], "sigmas": imp.sigmas, "importance_seconds": imp.seconds, "ray_workers": args.ray_workers,
              "config": cfg.to_dict()["structured"]}
    log.info("dense ppl %.3f", result["dense"]["ppl"])
    models = {"dense": dense}
    rec_targets = {"none": [], "all": None}.get(args.recovery, None)
    if args.recovery not in ("none", "all"):
        rec_targets = [float(x) for x in args.recovery.split(",")]
    windows = None

    recover_rows = None if args.recover_rows is None else set(args.recover_rows.split(","))
    kd_rows = set(filter(None, args.kd_rows.split(",")))
    teacher = None

    def add_rows(model: torch.nn.Module, target: float, alloc: str, extra: dict) -> None:
        """The row of one pruned model, and its recovered twins where ``--recovery`` asks for them."""
        nonlocal windows, teacher
        name = f"{target}-{alloc}"
        row = {"target": target, "allocation": alloc, "recovered": False, "params": decoder_params(model),
               "total_params": sum(p.numel() for p in model.parameters()), **extra,
               "flops_per_token": flops_per_token(model),
               "ideal_speedup": result["dense"]["flops_per_token"] / flops_per_token(model),
               "ppl": ppl(model, (target, alloc, False)), "debian_cloze_acc": cloze_acc(model)}
        log.info("%s: ppl %.3f, cloze %s, removed %.4f", name, row["ppl"], row["debian_cloze_acc"],
                 row["removed_fraction"])
        result["rows"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=1))
        models[name] = model
        if recover_rows is not None and alloc not in recover_rows and f"{alloc}@{target}" not in recover_rows:
            return
        if rec_targets is not None and target not in rec_targets:
            return
        for loss in ("ce", "kd") if alloc in kd_rows or f"{alloc}@{target}" in kd_rows else ("ce",):
            if (target, alloc, loss) in old_recovered:
                o = old_recovered[(target, alloc, loss)]
                log.info("%s recovered (%s): reused from %s (ppl %.3f)", name, loss, args.ppl_from, o["ppl"])
                result["rows"].append({**row, "recovered": True, "loss": loss, "reused_from": args.ppl_from,
                                       **{k: o.get(k) for k in ("ppl", "debian_cloze_acc", "closed_gap", "recovery",
                                                                "recovery_losses")}})
                continue
            if windows is None:
                windows = recovery_windows(cfg, calib)  # (M, S) from the calibration source
            r = copy.deepcopy(cfg.structured.recovery)
            r.loss = loss
            if loss == "kd" and teacher is None:  # the dense model's targets on the windows every row draws
                used = used_windows(windows.shape[0], dense.config.num_hidden_layers, r)
                teacher = distill_targets(dense, windows, used, r.kd_topk, r.kd_temperature, progress=True)
            if loss == "kd" and used_windows(windows.shape[0], model.config.num_hidden_layers, r).numel() != \
                    used_windows(windows.shape[0], dense.config.num_hidden_layers, r).numel():
                raise SystemExit("--kd-rows: a row with blocks removed draws other windows (sequential schedule)")
            rmodel, rrep = recover(copy.deepcopy(model), windows, r, progress=True,
                                   teacher=teacher if loss == "kd" else None)
            rppl = ppl(rmodel, (target, alloc, loss))
            rrow = {**row, "recovered": True, "loss": loss, "ppl": rppl, "debian_cloze_acc": cloze_acc(rmodel),
                    "closed_gap": (row["ppl"] - rppl) / (row["ppl"] - result["dense"]["ppl"]),
                    "recovery": {k: v for k, v in rrep.items() if k != "phases"},
                    "recovery_losses": [p["losses"] for p in rrep["phases"]]}
            log.info("%s recovered (%s): ppl %.3f (%.0f%% of the gap closed, %.0f s)", name, loss, rrow["ppl"],
                     100 * rrow["closed_gap"], rrep["seconds"])
            result["rows"].append(rrow)
            Path(args.out).write_text(json.dumps(result, indent=1))
            del rmodel
        Path(args.out).write_text(json.dumps(result, indent=1))

    peer_cache: dict = {}
    for target in [float(x) for x in args.targets.split(",")]:
        for variant in args.rows.split(","):
            model, extra = prune_variant(dense, calib, cfg.structured, target, variant, importance)
            add_rows(model, target, variant, extra)
        if args.peer == "torch-pruning":
            peer_rows(add_rows, dense, calib, cfg, result, target, peer_cache)
    speed_threads = [int(x) for x in args.speed_threads.split(",") if x]
    if args.repeats > 0 and speed_threads:
        speed(result, models, tok, args.repeats, speed_threads)
    Path(args.out).write_text(json.dumps(result, indent=1))
    log_table(result, speed_threads if args.repeats > 0 else [])


def peer_rows(add_rows, dense: torch.nn.Module, calib: torch.Tensor, cfg, result: dict, target: float,
              cache: dict) -> None:
    """The Torch-Pruning row(s) at ``target``: the same decoder parameter count as the first SAAP row there
    (``cache`` keeps the Taylor gradients of the dense model for the run's other targets)."""
    from importlib.metadata import version

    import peer_torchpruning as peer  # beside this script (its folder leads sys.path)

    why = peer.available()
    if why is not None:
        result.setdefault("peer_skipped", why)
        log.warning("peer rows skipped: %s", why)
        return
    ours = next(r for r in result["rows"] if r["target"] == target and not r["recovered"])
    first, last = protected_blocks(cfg.structured, dense.config.num_hidden_layers)
    depth = dense.config.num_hidden_layers
    protected = set(range(first)) | set(range(depth - last, depth))
    if "grads" not in cache:
        cache["grads"] = peer.taylor_gradients(dense, calib)
    model, ratio = peer.prune_to_params(dense, cache["grads"], ours["params"], protected, cfg.structured.round_to)
    add_rows(model, target, "torch-pruning", {
        "removed_fraction": 1 - decoder_params(model) / result["dense"]["params"],
        "layer_sizes": [b.mlp.gate_proj.out_features for b in model.model.layers],
        "peer": {"package": "torch-pruning", "version": version("torch-pruning"), "importance": "taylor",
                 "groups": "mlp channels", "ratio": ratio, "matched_to": ours["allocation"]}})


def speed(result: dict, models: dict[str, torch.nn.Module], tok, repeats: int, threads: list[int]) -> None:
    """Prefill / decode tokens/s of every pruned model and the dense one, interleaved in one run per thread count.

    The first thread count fills ``prefill_tps`` / ``decode_tps``; the others ``prefill_tps_{n}t`` /
    ``decode_tps_{n}t``. Recovered rows take the numbers of their unrecovered twin (same shapes, same
    kernels); speedups are against the dense model of the same run.
    """
    result["speed"] = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "runs": {}}
    for i, n in enumerate(threads):
        torch.set_num_threads(n)
        load_before = os.getloadavg()
        sp = compare_speed(models, tok, prompt_len=512, new_tokens=128, batch_sizes=(1,), repeats=repeats)
        result["speed"]["runs"][f"{n}t"] = {
            **{k: v for k, v in sp.items() if k != "models"}, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "per_model": {k: m["batches"][0] for k, m in sp["models"].items()}}
        sfx = "" if i == 0 else f"_{n}t"
        d = sp["models"]["dense"]["batches"][0]
        result["dense"].update({f"prefill_tps{sfx}": d["prefill_tps"], f"decode_tps{sfx}": d["decode_tps"]})
        for row in result["rows"]:
            b = sp["models"][f"{row['target']}-{row['allocation']}"]["batches"][0]
            pre, dec = b["prefill_tps"] / d["prefill_tps"], b["decode_tps"] / d["decode_tps"]
            row.update({f"prefill_tps{sfx}": b["prefill_tps"], f"decode_tps{sfx}": b["decode_tps"],
                        f"prefill_speedup{sfx}": pre, f"decode_speedup{sfx}": dec,
                        f"prefill_vs_ideal{sfx}": pre / row["ideal_speedup"],
                        f"decode_vs_ideal{sfx}": dec / row["ideal_speedup"]})
    torch.set_num_threads(threads[0])


def log_table(result: dict, threads: list[int]) -> None:
    """The result as fixed-width tables in the log (one per speed thread count)."""
    d, nan = result["dense"], float("nan")
    for i, n in enumerate(threads or [0]):
        sfx = "" if i == 0 else f"_{n}t"
        lines = [f"{n} torch threads" if threads else "no speed measured",
                 f"{'row':<32}{'params':>11}{'MFLOP/tok':>10}{'ppl':>8}{'prefill':>9}{'decode':>8}{'ideal':>7}"
                 f"{'x pre':>7}{'x dec':>7}{'pre/id':>7}{'dec/id':>7}"]

        def line(name: str, r: dict, sfx: str = sfx) -> str:
            pre, dec = r.get(f"prefill_tps{sfx}", nan), r.get(f"decode_tps{sfx}", nan)
            ideal = d["flops_per_token"] / r["flops_per_token"]
            xp, xd = pre / d.get(f"prefill_tps{sfx}", nan), dec / d.get(f"decode_tps{sfx}", nan)
            return (f"{name:<32}{r['params']:>11}{r['flops_per_token'] / 1e6:>10.1f}{r['ppl']:>8.2f}{pre:>9.1f}"
                    f"{dec:>8.1f}{ideal:>7.3f}{xp:>7.3f}{xd:>7.3f}{xp / ideal:>7.2f}{xd / ideal:>7.2f}")

        lines.append(line("dense", d))
        for r in result["rows"]:
            tail = f" +{r.get('loss', 'ce')}" if r["recovered"] else ""
            lines.append(line(f"{r['target']:.0%} {r['allocation']}{tail}", r))
        log.info("results\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
