"""The coordinator: the one driver that sequences a run's phases and writes its artifacts."""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from orchestrator import __version__, groups
from orchestrator.engine.device import Placement, native_bf16
from orchestrator.engine.local import PruneOutcome, pruned_weight_names, run_local
from orchestrator.errors import UsageError
from orchestrator.eval_phase import (
    drop_model_dir,
    evaluate_sweep,
    evaluate_sweep_files,
    loaded,
    reached_sparsity,
    record,
    speed,
    speed_from_checkpoints,
)
from orchestrator.evaluation import dense_cache
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.data import (
    calibration_windows,
    check_source,
    check_vocab,
    first_windows,
    leading_special_tokens,
    load_texts,
    tokenize_corpus,
)
from orchestrator.inputs.models import load_model, load_tokenizer, materialize, model_skeleton
from orchestrator.outputs import model_card
from orchestrator.outputs.artifacts import REPORT_SCHEMA_VERSION, RunWriter, output_lock
from orchestrator.outputs.assemble import place_shards, sparsity_from_rows
from orchestrator.outputs.report import render_markdown, render_plots, validate_report
from orchestrator.resume import prepare_checkpoints
from orchestrator.testhooks import hold_at_phase

log = logging.getLogger(__name__)


EventHook = Callable[[str, dict], None]


class PhaseTimer:
    """Wall-clock seconds per named phase, logged as each ends.

    Args:
        on_event: optional callback ``(event, fields)`` called with ``("phase_start", {"phase"})``
            and ``("phase_end", {"phase", "seconds", "ok"})``; exceptions it raises are logged, not raised.
    """

    def __init__(self, on_event: EventHook | None = None, hold_name: str | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_event = on_event
        self.hold_name = hold_name  # the run's output.dir, for the tests' phase holds (orchestrator.testhooks)

    def emit(self, event: str, **fields) -> None:
        """Send one event to the callback (never fails the run)."""
        if self.on_event is None:
            return
        try:
            self.on_event(event, fields)
        except Exception:  # noqa: BLE001 - a broken observer must not kill a long run
            log.warning("event hook failed on %s", event, exc_info=True)

    @contextmanager
    def phase(self, name: str):
        """Time the enclosed block as ``name``."""
        log.info("phase %s: start", name)
        self.emit("phase_start", phase=name)
        if self.hold_name:
            hold_at_phase(self.hold_name, name)
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            log.info("phase %s: %.1f s", name, self.seconds[name])
            self.emit("phase_end", phase=name, seconds=self.seconds[name], ok=ok)


def eval_windows(cfg: RunConfig, tokenizer, model) -> torch.Tensor | None:
    """The evaluation windows of a run, or None when evaluation is off or has no source."""
    e = cfg.eval
    if not e.enabled:
        return None
    if not e.source:
        log.info("eval.source is not set: skipping perplexity evaluation")
        return None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and e.seq_len > max_pos:
        raise UsageError(f"eval.seq_len: {e.seq_len} exceeds the model's maximum of {max_pos}")
    tokens = tokenize_corpus(load_texts(e.source, e.text_column, "eval.source", revision=e.revision), tokenizer)
    check_vocab(tokens, model, "eval.source")
    return first_windows(tokens, e.seq_len, e.num_windows, "eval.source", leading_special_tokens(tokenizer))


def local_checkpointing(cfg: RunConfig, model) -> bool:
    """Whether the single-process gradient pass checkpoints block activations (the host's memory is its budget)."""
    from orchestrator.engine.device import device_memory_bytes
    from orchestrator.planner import choose_checkpointing

    return choose_checkpointing(cfg, model.config, 1, device_memory_bytes("cpu"))


#: where the ranks of a distributed sweep write its candidates, inside the run's temp directory (removed before
#: publishing: the kept files are linked into place)
SWEEP_SHARDS = ".sweep-shards"


def sharded_run(cfg: RunConfig) -> bool:
    """Whether the run's tensors stay on the ranks (``backend: ray``, not structured): the coordinator then
    holds the model's structure only, and the ranks write the pruned checkpoints (a sweep's candidates too)."""
    return cfg.backend.kind == "ray" and not cfg.structured.enabled


def prune_with_backend(cfg: RunConfig, model, model_path: str, calib: torch.Tensor, progress: bool,
                       checkpoint_dir: Path | None = None) -> tuple[PruneOutcome, list[dict], object]:
    """Run the configured backend: ``(outcome, memory per worker, the ray result or None)``.

    In one process ``model`` holds the pruned weights afterwards; on Ray ``model`` is the meta-device
    skeleton and the result names the files the ranks wrote (:class:`~actors.distributed.RayResult`).
    """
    if cfg.backend.kind == "local":
        if cfg.backend.num_threads:
            torch.set_num_threads(cfg.backend.num_threads)
        cfg = cfg.with_compute_dtypes(native_bf16("cpu"))
        outcome = run_local(model, calib, cfg.pruning, Placement.of("cpu", cfg.backend.forward_dtype), progress,
                            local_checkpointing(cfg, model))
        outcome.dtypes = cfg.compute_dtypes()
        return outcome, [], None
    from actors.distributed import run_ray  # Ray and DeepSpeed only load for this backend
    from orchestrator.inputs.fingerprints import checkpoint_inputs

    inputs = checkpoint_inputs(cfg.model, calib) if checkpoint_dir is not None else None  # a resume must match
    result = run_ray(cfg, model_path, calib, progress=progress, checkpoint_dir=checkpoint_dir,
                     spec=groups.prune_spec(cfg), inputs=inputs)
    return result.outcome, result.memory, result


def run_prune(cfg: RunConfig, progress: bool = True, on_event: EventHook | None = None,
              run_key: str | None = None, resume: bool = False, run_tag: str | None = None) -> Path:
    """Prune, evaluate and write a run directory; returns its final path.

    The output directory's lock (:func:`~orchestrator.outputs.artifacts.output_lock`) is held from
    the first check to the end, covering its checkpoints (``.NAME.ckpt``) and temp directory.

    Args:
        cfg: the validated run config.
        progress: show progress bars.
        on_event: optional observer of phase starts/ends and of the finished run
            (``("done", {"run_dir"})``), e.g. for a job service's status endpoint.
        run_key: content key of a scheduled run (``orchestrator.surfaces.runkeys``), written as the
            ``run_key`` file and into report.json.
        resume: continue an interrupted distributed run from its checkpoints.
        run_tag: names the temp directory ``.NAME.tmp-<run_tag>`` (e.g. a job id), see
            :class:`~orchestrator.outputs.artifacts.RunWriter`.

    Raises:
        UsageError: bad input, or another run is using ``output.dir`` (nothing is written).
        RayPruneError: the distributed run failed after its retries (its checkpoints are kept).
    """
    import shutil

    timer = PhaseTimer(on_event, hold_name=cfg.output.dir)
    with output_lock(cfg.output.dir):  # one run per output.dir: its checkpoints and temp dir are its own
        ckpt = prepare_checkpoints(cfg, resume)
        if cfg.backend.kind == "ray":  # before any model work: a bad address, too few workers or memory fails now
            groups.check_prune_plan(cfg, groups.check_prune_capacity(cfg))
        try:
            final = _run(cfg, timer, progress, run_key, ckpt, run_tag)
        except BaseException:
            if ckpt is not None and ckpt.is_dir() and not (ckpt / "progress.json").is_file():
                shutil.rmtree(ckpt, ignore_errors=True)  # nothing worth resuming was saved
            raise
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)  # the run is complete: its checkpoints are not needed
    timer.emit("done", run_dir=str(final))
    return final


def _run(cfg: RunConfig, timer: PhaseTimer, progress: bool, run_key: str | None, ckpt: Path | None,
         run_tag: str | None = None) -> Path:
    """Load, prune, evaluate, publish; returns the published run directory."""
    from orchestrator.evaluation.evaluator import Evaluator

    if cfg.calibration.source != "generate":
        check_source(cfg.calibration.source, "calibration.source")  # before minutes of model loading
    if cfg.eval.enabled and cfg.eval.source:
        check_source(cfg.eval.source, "eval.source")
    sharded = sharded_run(cfg)
    with RunWriter(cfg.output, tag=run_tag) as writer:
        with timer.phase("load"):
            model_path = materialize(cfg.model)
            tokenizer = load_tokenizer(model_path, cfg.model)
            # a distributed run's coordinator knows the model's structure only (meta device, no weights)
            model = model_skeleton(model_path, cfg.model) if sharded else load_model(model_path, cfg.model)
        with timer.phase("data"):
            generates = cfg.calibration.source == "generate"  # the model writes its own text: loaded for that
            calib = calibration_windows(cfg, model_path, tokenizer, None if sharded and generates else model)
            windows = eval_windows(cfg, tokenizer, model)
        evaluator = Evaluator(cfg, model_path, tokenizer, windows, progress, groups.eval_actors(cfg, progress))
        try:
            report = _prune_and_evaluate(cfg, timer, writer, evaluator, model, model_path, tokenizer, calib, progress,
                                         ckpt)
        finally:
            evaluator.close()
        parts = {f"eval_{k}": v for k, v in evaluator.seconds.items()}  # e.g. eval_pruned.perplexity
        report.update({"run_key": run_key, "phases": {**timer.seconds, **report["phases"], **parts}})
        if run_key:
            writer.path("run_key").write_text(run_key + "\n")
        validate_report(report)
        if writer.path("model").is_dir():
            model_card.write(writer.path("model"), report)
        writer.write_json("report.json", report)
        writer.path("report.md").write_text(render_markdown(report))
        render_plots(report, writer.tmp)
        final = writer.publish()
    metrics = report["metrics"]
    log.info("reached sparsity %.4f; %s", report["sparsity"]["reached"],
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("ppl")) or "no evaluation")
    return final


def _prune_and_evaluate(cfg: RunConfig, timer: PhaseTimer, writer: RunWriter, evaluator, model, model_path: str,
                        tokenizer, calib: torch.Tensor, progress: bool, ckpt: Path | None = None) -> dict:
    """The phases between loading and publishing; returns the report (without run_key)."""
    windows = evaluator.windows
    metrics: dict = {"eval_seq_len": cfg.eval.seq_len, "eval_windows": None if windows is None else len(windows)}
    zeroshot: dict = {}
    extra: dict = {}
    grouped = evaluator.distributed
    sharded = sharded_run(cfg)
    dense_cached = False
    if evaluator.active and cfg.eval.dense_baseline:
        with timer.phase("eval_dense"):
            key = dense_cache.dense_key(cfg, windows, evaluator.tasks, evaluator.lm_eval_tasks) \
                if cfg.eval.cache_dense else None
            res = dense_cache.load(key) if key else None
            dense_cached = res is not None
            if dense_cached:
                log.info("dense evaluation reused from the cache (key %s; eval.cache_dense=false measures it)",
                         key[:12])
            else:
                res = evaluator.evaluate(loaded(cfg, model, model_path, sharded and not grouped),
                                         evaluator.ref("dense") if grouped else None, "dense")
                if key:
                    dense_cache.store(key, res)
            record(metrics, zeroshot, "dense", res)
            evaluator.close()  # the pruning workers need these devices
    structured = None
    with timer.phase("prune"):
        if cfg.structured.enabled:
            from orchestrator.structured.run import run_structured

            dense_params = sum(p.numel() for p in model.parameters())
            model, structured = run_structured(cfg, model, calib, progress, groups.distributed_recovery(cfg),
                                               groups.sharded_importance(cfg, model_path, progress))
            structured["parameters_before"] = dense_params
            structured["parameters_after"] = sum(p.numel() for p in model.parameters())
            outcome, memory, sweep = PruneOutcome(), structured.pop("importance_workers"), None
        elif cfg.pruning.sweep:
            from orchestrator.engine.sweep import main_sparsity, run_sweep

            memory = []
            if sharded:  # the ranks write every candidate; the coordinator gets rows and file records
                from actors.sweep import run_ray_sweep

                sweep = run_ray_sweep(cfg, model_path, calib, progress, spec=groups.prune_spec(cfg),
                                      root=writer.tmp / SWEEP_SHARDS)
                memory = sweep.memory
                ray_result = next(r for s, r in sweep.candidates if s == main_sparsity(cfg.pruning))
                outcome = ray_result.outcome
            else:
                run_cfg = cfg.with_compute_dtypes(native_bf16("cpu"))
                sweep = run_sweep(model, calib, run_cfg.pruning, Placement.of("cpu", run_cfg.backend.forward_dtype),
                                  progress, local_checkpointing(cfg, model))
                for c in sweep.candidates:
                    c.outcome.dtypes = run_cfg.compute_dtypes()
                main = next(c for c in sweep.candidates if c.sparsity == main_sparsity(cfg.pruning))
                model, outcome = main.model, main.outcome
            outcome.phases = sweep.phases
        else:
            outcome, memory, ray_result = prune_with_backend(cfg, model, model_path, calib, progress, ckpt)
            sweep = None
    names = pruned_weight_names(model)
    frac, zeros, total = sparsity_from_rows(outcome.layers) if sharded else reached_sparsity(model, names)
    with timer.phase("save"):
        if sharded:  # the ranks wrote every tensor; the coordinator adds the metadata around them
            writer.known_hashes.update(place_shards(writer.tmp, ray_result.root, ray_result.files, model.config,
                                                    model.generation_config, tokenizer))
        elif cfg.output.save_model:
            if structured is not None:
                from orchestrator.structured.shrink import save_structured

                save_structured(model, writer.path("model"), tokenizer)
            else:
                writer.write_model(model, tokenizer)
        if structured is None and not sharded:
            writer.write_masks(outcome.masks)
        writer.write_config(cfg)
    if sweep is not None and evaluator.active:
        with timer.phase("eval_sweep"):
            extra["sweep"], extra["sweep_passes"] = (
                evaluate_sweep_files(sweep, evaluator, writer, model, tokenizer) if sharded else
                evaluate_sweep(sweep, evaluator, writer, names))
            main_row = next(r for r in extra["sweep"] if r["sparsity"] == main_sparsity(cfg.pruning))
            record(metrics, zeroshot, "pruned", {"ppl": main_row["ppl"], "zeroshot": main_row["zeroshot"]})
    elif evaluator.active:
        with timer.phase("eval_pruned"):
            ref = None
            if grouped and structured is None and not sharded:
                params = dict(model.named_parameters())
                ref = evaluator.ref("pruned", {n: params[n].detach() for n in names})
            elif grouped and (cfg.output.save_model or sharded):
                ref = evaluator.ref("pruned", path=str(writer.path("model")))
            pruned = loaded(cfg, model, str(writer.path("model")), sharded and not grouped)
            record(metrics, zeroshot, "pruned", evaluator.evaluate(pruned, ref, "pruned"))
            del pruned
    if sharded and sweep is not None:
        shutil.rmtree(writer.tmp / SWEEP_SHARDS, ignore_errors=True)  # what is kept is linked into place
    evaluator.close()  # free the actors' memory before the speed measurement
    if cfg.eval.speed:
        with timer.phase("speed"):
            extra["speed"] = (speed(cfg, model_path, model, tokenizer) if not sharded else
                              speed_from_checkpoints(cfg, model_path, str(writer.path("model")), tokenizer))
    if sharded and not cfg.output.save_model:  # the ranks' shards served the evaluation; not kept
        drop_model_dir(writer)
    if zeroshot:
        extra["zeroshot"] = zeroshot
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "rayprune_version": __version__,
        "config_fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "model": {"path": model_path, "architecture": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "sparsity": {"target": cfg.pruning.target_sparsity if not cfg.pruning.sweep else
                     main_sparsity(cfg.pruning), "reached": frac, "zeros": zeros, "pruned_weights_total": total},
        "metrics": metrics,
        "phases": {f"prune.{k}": round(v, 3) for k, v in outcome.phases.items()},
        "compute_dtypes": outcome.dtypes or None,
        "memory_per_worker": memory,
        "structured": structured,
        "layers": outcome.layers,
        "eval": {"workers": cfg.eval_workers(), "tasks": sorted(zeroshot.get("pruned", zeroshot.get("dense", {}))),
                 "dense_cached": dense_cached},
        **extra,
        "host": {"python": platform.python_version(), "torch": torch.__version__},
    }
