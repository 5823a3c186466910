"""The Python API: ``from orchestrator import prune``.

One call does what ``rayprune prune`` does (the CLI is a thin user of it): it builds and validates the run
config from a YAML file, a :class:`~orchestrator.inputs.config.RunConfig` or a plain dict, plus overrides,
prunes, evaluates, publishes the run directory, and returns a :class:`PruneResult`::

    from orchestrator import prune

    result = prune("configs/default.yaml", model="HuggingFaceTB/SmolLM2-135M", dataset="/data/calib.parquet",
                   pruning={"method": "gblm", "sparsity": 0.5}, overrides={"backend.workers": 4})
    print(result.run_dir, result.metrics["pruned_ppl"], result.sparsity)

Inside a Ray Job (``ray job submit -- python my_job.py``) the same call joins the job's cluster with
``backend={"address": "auto"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.inputs.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    """What one run produced.

    Attributes:
        run_dir: the published run directory (``model/``, ``masks``, ``report.json``, ``report.md``, ...).
        report: the run's ``report.json``.
        run_key: the content key of a keyed run (``--if-changed`` or ``{key}`` in ``output.dir``), else None.
        reused: a keyed run whose key had already been published, so nothing ran.
    """

    run_dir: Path
    report: dict[str, Any] = field(repr=False)
    run_key: str | None = None
    reused: bool = False

    @property
    def metrics(self) -> dict[str, Any]:
        """The measured metrics (``dense_ppl``, ``pruned_ppl``, task scores, ...)."""
        return self.report["metrics"]

    @property
    def sparsity(self) -> float:
        """The sparsity the pruned linears reached."""
        return float(self.report["sparsity"]["reached"])

    @property
    def model_dir(self) -> Path:
        """The pruned checkpoint (``from_pretrained`` loads it)."""
        return self.run_dir / "model"

    def summary(self) -> dict[str, Any]:
        """The one-line result the CLI prints: run directory, reached sparsity, perplexities, run key."""
        out: dict[str, Any] = {"run_dir": str(self.run_dir), "reached_sparsity": round(self.sparsity, 6)}
        out.update({k: round(v, 4) for k, v in self.metrics.items() if k.endswith("_ppl")})
        if self.run_key is not None:
            out.update(run_key=self.run_key, reused=self.reused)
        return out


def build_config(config: RunConfig | str | Path | Mapping[str, Any] | None = None, *, model: str | None = None,
                 dataset: str | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                 **sections: Mapping[str, Any]) -> RunConfig:
    """A validated run config from a base and overrides (later ones win: sections, model and dataset, overrides).

    Args:
        config: a YAML path, a ``RunConfig``, a dict shaped like the YAML, or None (the defaults).
        model: ``model.source`` (a hub id, a local directory, a ``.gguf`` file or a builtin name).
        dataset: ``calibration.source`` (a Parquet/JSONL file, a ``builtin:`` corpus or a hub dataset id).
        overrides: ``{"pruning.sparsity": 0.6}`` (Python values) or ``["pruning.sparsity=0.6"]`` (YAML text).
        **sections: section dicts, e.g. ``pruning={"method": "wanda"}``, ``backend={"workers": 4}``.

    Raises:
        UsageError: an unknown key or a bad value (one line naming it).
    """
    from orchestrator.inputs.loader import config_from_dict, read_config_file

    if isinstance(config, RunConfig):
        data = config.to_dict()
    elif isinstance(config, Mapping):
        data = json.loads(json.dumps(dict(config)))
    else:
        data = read_config_file(config)
    for name, section in sections.items():
        if not isinstance(section, Mapping):
            raise UsageError(f"{name}: expected a dict of its keys, got {type(section).__name__}")
        _merge(data.setdefault(name, {}), section)
    if model is not None:
        data.setdefault("model", {})["source"] = model
    if dataset is not None:
        data.setdefault("calibration", {})["source"] = dataset
    text: list[str] = []
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    elif overrides is not None:
        text = [str(o) for o in overrides]
    return config_from_dict(data, text)


def prune(config: RunConfig | str | Path | Mapping[str, Any] | None = None, *, model: str | None = None,
          dataset: str | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
          progress: bool = True, resume: bool = False, if_changed: bool = False, force: bool = False,
          **sections: Mapping[str, Any]) -> PruneResult:
    """Prune, evaluate and publish one run; the ``rayprune prune`` command as a function.

    Args:
        config, model, dataset, overrides, **sections: as for :func:`build_config`.
        progress: progress bars on stderr.
        resume: continue the interrupted distributed run in ``output.dir`` from its checkpoints.
        if_changed: compute the run's content key first and reuse a published run with that key; an
            interrupted run of the same config in ``output.dir`` is resumed (a schedule continues by itself).
        force: with ``if_changed``, run even when the key was published.

    Returns:
        The :class:`PruneResult`.

    Raises:
        UsageError: bad input (nothing is written).
        RayPruneError: the run failed (a distributed run's checkpoints are kept for ``resume``).
    """
    cfg = build_config(config, model=model, dataset=dataset, overrides=overrides, **sections)
    key = final = None
    if if_changed or "{key}" in cfg.output.dir:
        from orchestrator.surfaces.runkeys import prepare_run

        key, final = prepare_run(cfg, reuse=if_changed, force=force)  # no model work before this
    reused = final is not None
    if final is None:
        from orchestrator.coordinator import run_prune
        from orchestrator.outputs.publish import checkpoint_path
        from orchestrator.resume import interrupted_run_matches

        if if_changed and not resume and interrupted_run_matches(cfg):  # an unattended schedule continues
            log.info("resuming the interrupted run of this config from %s", checkpoint_path(cfg.output.dir))
            resume = True

        final = run_prune(cfg, progress=progress, run_key=key, resume=resume)
        if key is not None:
            from orchestrator.surfaces.runkeys import record_run

            record_run(final, key)
    report = json.loads((Path(final) / "report.json").read_text())
    return PruneResult(Path(final), report, key, reused)


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Deep-merge ``new`` into ``into`` (dicts recurse; other values replace)."""
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a deadline, a pod eviction) raised where the run is, like Ctrl-C: every
    ``finally`` and context manager on the way out runs, so the run's temp directory, cache temp
    directories, lock and worker groups are removed and only a distributed run's checkpoints stay."""


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` inside the ``with`` block (main thread only; restored after).

    Python's default for SIGTERM ends the process on the spot, leaving temp state behind. The CLI runs
    every command inside this; a Ray Job script calling :func:`prune` should too
    (``deploy/ray_job_example.py``). Once Ray starts in the process its own driver handler takes over,
    which exits through ``SystemExit`` and cleans up the same way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

