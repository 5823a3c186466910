"""``rayprune`` command line: prune, eval, plan.

Exit codes: 0 success, 1 runtime failure, 2 bad usage/config/input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from orchestrator.errors import RayPruneError, UsageError

log = logging.getLogger("rayprune")

EPILOG = """\
examples:
  rayprune prune configs/default.yaml                 prune SmolLM2-135M with GBLM (2 Ray workers)
  rayprune prune configs/default.yaml pruning.method=wanda pruning.pattern=2:4 output.dir=runs/wanda24
  rayprune prune backend.kind=local model.source=tiny calibration.num_samples=4 calibration.seq_len=32
  rayprune eval runs/default eval.source=builtin:python-topics-eval
  rayprune plan configs/default.yaml --gpu-mem 80

Overrides are KEY=VALUE with dotted keys into the YAML config (values parsed as YAML).
All config problems are reported at once; bad input exits with status 2.
"""


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not ``KEY=VALUE`` is the config path; the rest are overrides."""
    config = None
    overrides = []
    for item in items:
        if "=" not in item and config is None and not overrides:
            config = item
        else:
            overrides.append(item)
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rayprune`` command."""
    parser = argparse.ArgumentParser(
        prog="rayprune",
        description="Prune large language models on a Ray cluster (GBLM, Wanda, SparseGPT, magnitude).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model, evaluate it and write a run directory",
                       description="Prune a model as the config says; write model/, the masks "
                                   "(masks/ and its index on Ray, masks.safetensors in one process), "
                                   "config.yaml, report.json and report.md into output.dir.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="YAML config (optional: defaults otherwise) followed by overrides")
    p.add_argument("--if-changed", action="store_true",
                   help="scheduled run: compute the run key (config, model revision, calibration data) first and "
                        "return a finished run with the same key instead of recomputing; '{key}' in output.dir "
                        "becomes the short key (e.g. output.dir=runs/nightly-{key})")
    p.add_argument("--force", action="store_true",
                   help="with --if-changed: recompute even if a finished run has the same key")
    p.add_argument("--resume", metavar="OUTPUT_DIR",
                   help="continue an interrupted distributed run from its checkpoints (kept next to OUTPUT_DIR "
                        "as .NAME.ckpt); the config defaults to the one saved with the checkpoints")
    p.add_argument("--json-out", dest="json_out", metavar="FILE", help="also write the result line to this file")

    e = sub.add_parser("eval", help="perplexity of a checkpoint or run directory",
                       description="Evaluate perplexity (eval.* settings) of a model directory, a run "
                                   "directory (its model/), a .gguf file or a builtin model name.")
    e.add_argument("model", help="model directory, run directory, .gguf file or builtin name")
    e.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="config and overrides for eval.*")
    e.add_argument("--json", dest="json_out", help="also write the result as JSON to this file")

    pl = sub.add_parser("plan", help="memory and communication plan per worker (reads the model config only)")
    pl.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    pl.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory per worker in GiB (default 80)")
    pl.add_argument("--model-config", help="a model config.json to plan for instead of the run's model")
    pl.add_argument("--accelerator", choices=["h100", "h200", "a100", "cpu"], default="h100",
                    help="predict phase times on this accelerator (cpu: measure this machine; default h100)")
    pl.add_argument("--shape", choices=["llama2-13b", "llama2-70b", "llama3-70b"],
                    help="plan for a published model shape instead of the run's model")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    pl.add_argument("--link", choices=["nvlink", "infiniband", "tcp"], default="infiniband",
                    help="the fabric between nodes (default infiniband; tcp: e.g. one GPU per pod)")
    x = sub.add_parser("export", help="write an llm-compressor recipe that quantizes a run's pruned checkpoint",
                       description="Write RUN_DIR/quantize/recipe-SCHEME.yaml: llm-compressor quantizes the pruned "
                                   "checkpoint with it and keeps its zeros (README 'Quantization hand-off').")
    x.add_argument("run_dir", help="a run directory written by 'rayprune prune'")
    x.add_argument("--scheme", default="W8A8", choices=["W8A8", "FP8_DYNAMIC", "W4A16", "W4A16-GPTQ"],
                   help="quantization scheme (default W8A8)")
    x.add_argument("--out", help="the recipe file (default RUN_DIR/quantize/recipe-SCHEME.yaml)")
    x.add_argument("--group-size", type=int, default=128,
                   help="weights per int4 scale of the W4A16 schemes (must divide every linear's input size)")
    r = sub.add_parser("report", help="re-render report.md and the plots of a run from its report.json")
    r.add_argument("run_dir", help="a run directory written by 'rayprune prune'")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "httpx", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning)


#: where the result line goes: the process's real stdout, while everything else written to stdout (Ray's
#: forwarded worker output, libraries' prints) goes to stderr (:func:`_stdout_is_the_result`)
_RESULT_STREAM: Any = None


@contextlib.contextmanager
def _stdout_is_the_result(keep: bool) -> Iterator[None]:
    """Point file descriptor 1 at stderr for the command, so the result line is the only line on stdout.

    ``keep``: leave fd 1 on stderr when the command returns (the console script: Ray's log monitor may still
    forward a worker's line after the result). A stdout without a file descriptor (a test's capture) is
    written as it is.
    """
    global _RESULT_STREAM
    try:
        fd = sys.stdout.fileno()
        err = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptor: Python-level writes only
        _RESULT_STREAM = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            _RESULT_STREAM = None
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    os.dup2(err, fd)
    _RESULT_STREAM = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _RESULT_STREAM.flush()
        _RESULT_STREAM.close()
        _RESULT_STREAM = None
        if not keep:
            sys.stdout.flush()
            os.dup2(saved, fd)
        os.close(saved)


def _emit(result: dict, json_out: str | None = None) -> None:
    """Write ``result`` as the one JSON line on stdout (and to ``json_out``, indented, when given)."""
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    stream = _RESULT_STREAM or sys.stdout
    stream.write(json.dumps(result) + "\n")
    stream.flush()


def cmd_prune(ns: argparse.Namespace) -> int:
    """``rayprune prune``: a thin user of :func:`orchestrator.api.prune`."""
    from orchestrator.api import prune

    path, overrides = _split_args(ns.args)
    if ns.resume:
        from orchestrator.outputs.publish import checkpoint_path

        ckpt = checkpoint_path(ns.resume)
        if not (ckpt / "progress.json").is_file():
            raise UsageError(f"--resume: no checkpoint of an interrupted run at {str(ckpt)!r}")
        if path is None:
            from orchestrator.resume import confirm_checkpoint_config

            path = str(ckpt / "config.yaml")
            confirm_checkpoint_config(path, overrides)
        overrides = [*overrides, f"output.dir={Path(ns.resume).expanduser().resolve()}"]
    result = prune(path, overrides=overrides, progress=not ns.quiet, resume=bool(ns.resume),
                   if_changed=ns.if_changed, force=ns.force)
    _emit(result.summary(), ns.json_out)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """``rayprune eval``."""
    from orchestrator.coordinator import eval_windows
    from orchestrator.evaluation.perplexity import perplexity
    from orchestrator.inputs.loader import load_config
    from orchestrator.inputs.models import load_tokenizer, materialize
    from orchestrator.structured.shrink import load_checkpoint

    path, overrides = _split_args(ns.args)
    target = Path(ns.model)
    if (target / "model" / "config.json").is_file():
        target = target / "model"
    cfg = load_config(path, [*overrides, f"model.source={target if target.exists() else ns.model}"])
    if not cfg.eval.source:
        raise UsageError("eval.source: not set (e.g. eval.source=builtin:python-topics-eval)")
    model_path = materialize(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    model = load_checkpoint(model_path, cfg.model)
    windows = eval_windows(cfg, tokenizer, model)
    ppl = perplexity(model, windows, progress=not ns.quiet)
    result = {"model": str(model_path), "ppl": ppl, "seq_len": cfg.eval.seq_len, "windows": int(windows.shape[0])}
    log.info("perplexity %.4f (context %d, %d windows)", ppl, cfg.eval.seq_len, windows.shape[0])
    _emit(result, ns.json_out)
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    """``rayprune plan``."""
    from orchestrator.inputs.loader import load_config
    from orchestrator.inputs.models import load_model_config, materialize
    from orchestrator.plan_fit import device_need, format_need, link_bw
    from orchestrator.planner import SHAPES, choose_checkpointing, format_plan, min_workers, plan, run_plan_kwargs
    from orchestrator.shapes import ModelShape
    from orchestrator.timing import PROFILES, format_times, predict_run

    path, overrides = _split_args(ns.args)
    cfg = load_config(path, overrides)
    if ns.shape:
        model_config = SHAPES[ns.shape]
    elif ns.model_config:
        mc_path = Path(ns.model_config)
        if not mc_path.is_file():
            raise UsageError(f"--model-config: file {str(mc_path)!r} does not exist")
        try:
            model_config = json.loads(mc_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"--model-config: {str(mc_path)!r} is not valid JSON ({exc})") from None
        if not isinstance(model_config, dict):
            raise UsageError(f"--model-config: {str(mc_path)!r} must hold a JSON object")
    else:
        model_config = load_model_config(materialize(cfg.model, weights=False), cfg.model)
    gpu = int(ns.gpu_mem * 2**30)
    if ns.accelerator == "cpu":
        from orchestrator.engine.device import native_bf16

        native = native_bf16("cpu")
    else:
        native = PROFILES[ns.accelerator].native_bf16
    cfg = cfg.with_compute_dtypes(native)  # `auto` compute dtypes as that accelerator resolves them
    kw = run_plan_kwargs(cfg)
    workers = kw.pop("workers")
    auto = cfg.backend.activation_checkpointing is None  # null: on where needed, so the fewest workers use it
    on_gpu = ns.accelerator != "cpu"
    try:
        need = min_workers(model_config, gpu, checkpoint=auto or cfg.backend.activation_checkpointing,
                           safety_factor=1.0, need=lambda p: device_need(p, on_gpu).total_bytes, **kw)
    except ValueError as exc:
        need = f"none ({exc})"
    checkpoint = choose_checkpointing(cfg, model_config, workers, gpu)
    result = plan(model_config, workers=workers, checkpoint=checkpoint, host_collectives=not on_gpu, **kw)
    sys.stdout.write(format_plan(result) + "\n")
    sys.stdout.write(format_need(result, gpu, on_gpu) + "\n")
    sys.stdout.write(f"workers needed with {ns.gpu_mem:g} GiB per GPU: {need}\n")
    sys.stdout.write(_eval_line(model_config, cfg, gpu, ns.gpu_mem) + "\n")
    if cfg.structured.enabled and cfg.structured.recovery.enabled:
        sys.stdout.write(_recovery_line(model_config, cfg, gpu, ns.gpu_mem) + "\n")
    if ns.accelerator == "cpu":
        from orchestrator.engine.profile import measure_cpu

        shape = ModelShape.from_config(model_config)  # measured at the run's matmul shape
        tokens = cfg.backend.grad_batch_size * cfg.calibration.seq_len
        threads = max(1, (os.cpu_count() or 1) // workers)
        out = Path(cfg.output.dir).resolve()  # the checkpoints go next to the output directory
        acc = measure_cpu(threads, tokens, shape.hidden, shape.intermediate, shape=shape,
                          method=cfg.pruning.method, save_dir=next(p for p in (out.parent, *out.parents) if p.is_dir()))
        acc = acc.shared(workers * threads / (os.cpu_count() or 1))  # more workers than cores share them
    else:
        acc = PROFILES[ns.accelerator]
        bw, where = link_bw(acc.link_bw, ns.link, workers, max(1, ns.gpus_per_node))
        acc = dataclasses.replace(acc, link_bw=bw)
        sys.stdout.write(f"collectives: {where}, {bw / 1e9:.0f} GB/s per rank\n")
    sys.stdout.write(format_times(predict_run(cfg, model_config, acc, checkpoint), acc) + "\n")
    return 0


def _fit_line(what: str, per: str, holds: str, size: Callable[..., int], needed: Callable[..., int],
              gpu: int, gpu_mem: float, fix: str) -> str:
    """One planner line: the bytes one ``per`` needs, and whether one GPU ``holds`` it or how many share it.

    ``size(workers=N)`` gives the bytes per member of N; ``needed(gpu)`` the fewest members (ValueError: none);
    ``fix`` is the settings line, formatted with ``n``.
    """
    from orchestrator.planner import GIB

    whole = size(workers=1)
    try:
        n = needed(gpu)
    except ValueError as exc:
        return f"{what}: {whole / GIB:.2f} GiB per {per}; {exc}"
    if n == 1:
        return f"{what}: {whole / GIB:.2f} GiB per {per}: one {gpu_mem:g} GiB GPU holds {holds}"
    return (f"{what}: {whole / GIB:.2f} GiB per {per} does not fit {gpu_mem:g} GiB: {fix.format(n=n)} "
            f"({size(workers=n) / GIB:.2f} GiB each)")


def _eval_line(model_config: Any, cfg: Any, gpu: int, gpu_mem: float) -> str:
    """What evaluating one model takes: one actor, or ``eval.shard`` over how many."""
    from orchestrator.plan_fit import eval_bytes, eval_workers_needed
    from orchestrator.shapes import element_bytes

    kw = dict(seq_len=cfg.eval.seq_len, dtype_bytes=element_bytes(cfg.model.dtype))
    return _fit_line("evaluation", "actor", "the model", partial(eval_bytes, model_config, **kw),
                     partial(eval_workers_needed, model_config, **kw), gpu, gpu_mem,
                     "eval.shard=true eval.workers={n}")


def _recovery_line(model_config: Any, cfg: Any, gpu: int, gpu_mem: float) -> str:
    """What SAAP's LoRA recovery takes: one rank per replica, or ``structured.recovery.zero3`` over how many."""
    from orchestrator.plan_fit import recovery_bytes, recovery_workers_needed
    from orchestrator.shapes import element_bytes

    r = cfg.structured.recovery
    kw = dict(removed=cfg.structured.target, rank=r.rank, seq_len=r.seq_len,
              dtype_bytes=element_bytes(cfg.model.dtype))
    return _fit_line("recovery", "rank", "the shrunk model", partial(recovery_bytes, model_config, **kw),
                     partial(recovery_workers_needed, model_config, **kw), gpu, gpu_mem,
                     "structured.recovery.zero3=true structured.recovery.workers={n} or more")


def cmd_export(ns: argparse.Namespace) -> int:
    """``rayprune export``: the quantization hand-off's recipe (:mod:`orchestrator.outputs.handoff`)."""
    from orchestrator.outputs import handoff

    try:
        _emit(handoff.write(Path(ns.run_dir), ns.scheme, ns.out, ns.group_size))
    except FileNotFoundError as exc:
        raise UsageError(f"run_dir: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"--group-size: {exc}") from None
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """``rayprune report``."""
    from orchestrator.outputs.report import rerender

    for name in rerender(ns.run_dir):
        sys.stdout.write(f"{Path(ns.run_dir) / name}\n")
    return 0


TERMINATED = "terminated (SIGTERM): temp files removed; a distributed run's checkpoints are kept for --resume"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rayprune`` console script."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns.verbose, ns.quiet)
    handlers = {"prune": cmd_prune, "eval": cmd_eval, "plan": cmd_plan, "report": cmd_report, "export": cmd_export}
    results = ns.command in ("prune", "eval", "export")  # these print one JSON result line; plan and report print text
    from orchestrator.api import Terminated, terminate_cleanly

    try:
        with terminate_cleanly(), (_stdout_is_the_result(keep=argv is None) if results else contextlib.nullcontext()):
            return handlers[ns.command](ns)
    except RayPruneError as exc:
        sys.stderr.write(f"rayprune: error: {exc}\n")
        return exc.exit_code
    except Terminated:
        return _terminated(console=argv is None)
    except KeyboardInterrupt:
        sys.stderr.write("rayprune: interrupted\n")
        return 130
    except SystemExit as exc:  # Ray's driver handler answers SIGTERM with sys.exit(SIGTERM) once Ray runs
        if exc.code != signal.SIGTERM:
            raise
        return _terminated(console=argv is None)


def _terminated(console: bool) -> int:
    """Report a SIGTERM after the run's cleanup has run; the console script then ends at once.

    The run's temp state is gone by now (the exception unwound through every ``finally``). A process
    with Ray's core worker still attached can abort in its exit handlers after a signal (SIGABRT
    instead of the status below), so the console script leaves with ``os._exit``; the Ray cluster
    removes a dead driver's actors and placement groups itself.
    """
    sys.stderr.write(f"rayprune: {TERMINATED}\n")
    if console:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)
    return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
