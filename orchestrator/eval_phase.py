"""The coordinator's evaluation steps: recording results, sweep candidates, generation speed.

In one process the models are in memory; in a distributed run they are the checkpoints the ranks wrote,
loaded by evaluation actors (or, with ``eval.workers: 0``, by this process one at a time).
"""

from __future__ import annotations

import logging
import shutil

import torch

from orchestrator import groups
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.models import load_model
from orchestrator.outputs.artifacts import RunWriter
from orchestrator.outputs.assemble import place_shards, sparsity_from_rows

log = logging.getLogger(__name__)


def reached_sparsity(model, names: list[str]) -> tuple[float, int, int]:
    """Zeros over all pruned weights: ``(fraction, zeros, total)``."""
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    return zeros / max(total, 1), zeros, total


def record(metrics: dict, zeroshot: dict, label: str, res: dict) -> None:
    if res.get("ppl") is not None:
        metrics[f"{label}_ppl"] = res["ppl"]
    if res.get("zeroshot"):
        zeroshot[label] = res["zeroshot"]


def evaluate_sweep(sweep, evaluator, writer: RunWriter, names: list[str]) -> tuple[list[dict], dict]:
    """Evaluate every sweep candidate; their masks go to ``sweep/``."""
    from safetensors.torch import save_file

    refs = []
    for c in sweep.candidates:
        params = dict(c.model.named_parameters())
        refs.append(evaluator.ref(f"sweep-{c.sparsity}", {n: params[n].detach() for n in names})
                    if evaluator.distributed else None)
        save_file({k: v.contiguous().to(torch.bool) for k, v in c.outcome.masks.items()},
                  str(writer.path(f"sweep/masks-{c.sparsity:.4f}.safetensors")))
    results = evaluator.candidates([c.model for c in sweep.candidates], refs)
    rows = []
    for c, r in zip(sweep.candidates, results, strict=True):
        frac, _, _ = reached_sparsity(c.model, names)
        rows.append({"name": f"{c.sparsity:g}", "sparsity": c.sparsity, "reached": frac, "ppl": r["ppl"],
                     "zeroshot": r["zeroshot"]})
    return rows, {"gradient": sweep.gradient_passes, "activation": sweep.activation_passes}


def loaded(cfg: RunConfig, model, path: str, load: bool):
    """``model``, or (``load``) the checkpoint at ``path`` loaded in this process: a distributed run evaluated
    in the coordinator (``eval.workers: 0``), which then holds one model while it evaluates it."""
    if not load:
        return model
    log.info("eval.workers is 0: the coordinator loads %s to evaluate it (evaluation actors avoid that)", path)
    return load_model(path, cfg.model)


def drop_model_dir(writer: RunWriter) -> None:
    """Remove ``model/`` from the run (``output.save_model: false``) and its known hashes."""
    import shutil

    shutil.rmtree(writer.tmp / "model", ignore_errors=True)
    writer.known_hashes = {k: v for k, v in writer.known_hashes.items() if not k.startswith("model/")}


def speed_from_checkpoints(cfg: RunConfig, dense_path: str, pruned_path: str, tokenizer) -> dict:
    """Prefill/decode speed of the dense and the pruned checkpoint, side by side on one evaluation actor
    (in this process when ``eval.workers`` is 0)."""
    if not cfg.eval_workers():
        return speed(cfg, dense_path, load_model(pruned_path, cfg.model), tokenizer)
    e = cfg.eval
    return groups.speed_on_actor(cfg, {"dense": dense_path, "pruned": pruned_path},
                                 dict(prompt_len=e.speed_prompt_len, new_tokens=e.speed_new_tokens,
                                      batch_sizes=tuple(e.speed_batch_sizes), repeats=e.speed_repeats))


def evaluate_sweep_files(sweep, evaluator, writer: RunWriter, skeleton, tokenizer) -> tuple[list[dict], dict]:
    """Evaluate a distributed sweep's candidates from the checkpoints their ranks wrote.

    Each candidate is assembled under ``sweep/<sparsity>/`` (files linked, metadata written) and loaded from
    there by the evaluation actors; its ``model/`` is dropped afterwards, its masks are kept.
    """
    dirs = []
    for sparsity, res in sweep.candidates:
        rel = f"sweep/{sparsity:.4f}"
        hashes = place_shards(writer.tmp / rel, res.root, res.files, skeleton.config, skeleton.generation_config,
                              tokenizer)
        writer.known_hashes.update({f"{rel}/{k}": v for k, v in hashes.items() if not k.startswith("model/")})
        dirs.append(writer.tmp / rel)
    results = evaluator.checkpoints([str(d / "model") for d in dirs], [f"sweep-{s}" for s, _ in sweep.candidates])
    rows = []
    for (sparsity, res), r, d in zip(sweep.candidates, results, dirs, strict=True):
        shutil.rmtree(d / "model", ignore_errors=True)  # evaluated; the main candidate is the run's model/
        reached = sparsity_from_rows(res.outcome.layers)[0]
        rows.append({"name": f"{sparsity:g}", "sparsity": sparsity, "reached": reached, "ppl": r["ppl"],
                     "zeroshot": r["zeroshot"]})
    return rows, {"gradient": sweep.gradient_passes, "activation": sweep.activation_passes}


def speed(cfg: RunConfig, model_path: str, model, tokenizer) -> dict:
    """Prefill/decode tokens/s of the dense and the pruned model, side by side in this process."""
    from orchestrator.evaluation.speed import compare_speed

    e = cfg.eval
    dense = load_model(model_path, cfg.model)
    try:
        return compare_speed({"dense": dense, "pruned": model}, tokenizer, prompt_len=e.speed_prompt_len,
                             new_tokens=e.speed_new_tokens, batch_sizes=tuple(e.speed_batch_sizes),
                             repeats=e.speed_repeats)
    finally:
        del dense
