"""Which checkpoint a distributed run continues from: the checks made before any model work.

A distributed run keeps its phase checkpoints in ``.NAME.ckpt`` beside ``output.dir``
(:mod:`actors.checkpoint`). ``--resume`` continues one only when the same config (work fingerprint),
model and libraries made it; a new run refuses to start over one silently; a scheduled
``--if-changed`` run continues the interrupted run of its own config.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator.inputs.config import RunConfig
from orchestrator.outputs.publish import checkpoint_path


def interrupted_run_matches(cfg: RunConfig) -> bool:
    """Whether ``output.dir`` has the checkpoint of an interrupted run of this same config (same work
    fingerprint): what a scheduled ``--if-changed`` run continues instead of refusing every later tick."""
    try:
        progress = json.loads((checkpoint_path(cfg.output.dir) / "progress.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(progress, dict) and progress.get("fingerprint") == cfg.work_fingerprint()


def prepare_checkpoints(cfg: RunConfig, resume: bool) -> Path | None:
    """Check the checkpoint directory against ``resume`` before any work; returns it for ray runs."""
    ckpt = checkpoint_path(cfg.output.dir)
    uses = cfg.backend.kind == "ray" and not cfg.structured.enabled and not cfg.pruning.sweep
    exists = (ckpt / "progress.json").is_file()
    if resume:
        if not uses:
            raise UsageError("--resume: only distributed runs (backend.kind=ray, not structured or sweeps) keep "
                             "checkpoints")
        if not exists:
            raise UsageError(f"--resume: no checkpoint of an interrupted run at {str(ckpt)!r}")
        from orchestrator.inputs.fingerprints import checkpoint_inputs, inputs_mismatch, inputs_refusal

        try:
            progress = json.loads((ckpt / "progress.json").read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--resume: {str(ckpt / 'progress.json')!r} is not readable JSON ({exc})") from None
        if not isinstance(progress, dict):
            raise UsageError(f"--resume: {str(ckpt / 'progress.json')!r} is not a checkpoint's progress record")
        saved = progress.get("fingerprint")
        if saved != cfg.work_fingerprint():
            raise UsageError(f"--resume: checkpoint {str(ckpt)!r} was written by another config (model, data, "
                             f"pruning or numerics differ: {str(saved)[:12]} != {cfg.work_fingerprint()[:12]})")
        # model and libraries now, before minutes of loading; the windows once they are cut (actors.distributed)
        what = inputs_mismatch(progress.get("inputs"), checkpoint_inputs(cfg.model))
        if what:
            raise UsageError(inputs_refusal(ckpt, what))
    elif exists:
        raise UsageError(f"output.dir: an interrupted run left checkpoints in {str(ckpt)!r}; continue it with "
                         f"'rayprune prune --resume {cfg.output.dir}' or delete that directory")
    if not uses:
        return None
    return ckpt  # created by the first checkpoint write (actors.checkpoint.CheckpointStore)


#: settings that run code or read pickles: a checkpoint's config.yaml may not switch them on by itself
CONFIRM_ON_RESUME = ("model.trust_remote_code", "model.allow_pickle")


def confirm_checkpoint_config(path: str, overrides: list[str]) -> None:
    """Refuse a checkpoint's ``config.yaml`` that enables code execution the command line did not confirm.

    ``--resume`` reads the run's config from the checkpoint directory, which lies on shared storage that
    others may write; it is checked like a new run's config (by the loader), and settings that run code
    (:data:`CONFIRM_ON_RESUME`) must also be given on the command line.

    Raises:
        UsageError: naming the setting and how to confirm it.
    """
    from orchestrator.inputs.loader import read_config_file

    data = read_config_file(path)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    for key in CONFIRM_ON_RESUME:
        section, name = key.split(".")
        values = data.get(section)
        if isinstance(values, dict) and values.get(name) is True and key not in given:
            raise UsageError(f"--resume: the checkpoint's config.yaml sets {key}: true; confirm it on the command "
                             f"line ({key}=true) or pass the run's config file")
