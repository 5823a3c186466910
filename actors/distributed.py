"""Distributed engine (``backend: ray``): the coordinator's entry point.

The coordinator calls :func:`run_ray` with the group it chose (a :class:`~actors.group.GroupSpec`);
it checks that every rank sees the run's checkpoint directory (:mod:`actors.storage`), shards the
calibration windows into one Arrow file per worker, starts (or reuses) an
:class:`~actors.group.ActorGroup` of :class:`~actors.worker.PruneWorker`, runs the gradient pass
under ZeRO-3 (GBLM) and the block-sequential pass, and returns report rows, the files the ranks
wrote (the pruned checkpoint's shards and masks, :mod:`orchestrator.outputs.shards`) and per-worker
memory figures. No weight, mask or statistic comes back to the driver.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from actors.checkpoint import CheckpointStore
from actors.faults import Faults
from actors.gradient_pass import gradient_pass, gradient_spec
from actors.group import ActorGroup, GroupSpec
from actors.sharding import shard_bytes
from actors.worker import PruneWorker
from orchestrator.engine.block_step import block_configs, uses_activations
from orchestrator.engine.local import PruneOutcome
from orchestrator.inputs.config import RunConfig
from orchestrator.pruning.methods import gradient_kinds

log = logging.getLogger(__name__)

SCORER = 0  # the rank that scores a sweep's candidates (the block pass spreads its linears over the ranks)


@dataclass
class RayResult:
    """What a distributed run produced.

    Attributes:
        outcome: report rows and phase seconds (no masks: the ranks wrote them).
        root: the directory the ranks wrote into (the checkpoint directory, or ``shard_dir``).
        files: relative path under ``root`` -> ``{"path", "sha256", "bytes", "names"}`` of every file of the
            pruned checkpoint (``model/...``) and its masks (``masks/...``).
        memory: per worker ``peak_rss_bytes``, ``model_state_bytes``, ``grad_stat_bytes``, ``load_read_bytes``.
    """

    outcome: PruneOutcome
    root: Path | None = None
    files: dict[str, dict] = field(default_factory=dict)
    memory: list[dict] = field(default_factory=list)

    def _read(self, folder: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for rel in sorted(self.files):
            if rel.startswith(f"{folder}/"):
                out.update(load_file(str(self.root / rel)))
        return out

    @cached_property
    def masks(self) -> dict[str, torch.Tensor]:
        """Every mask the ranks wrote (bool, True = pruned), read from the files: for tests and tools, never
        the coordinator (it would hold them all)."""
        return self._read("masks")

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """The pruned linears' weights the ranks wrote, read from the files (tests and tools only)."""
        names = set(self.masks)
        return {k: v for k, v in self._read("model").items() if k in names}


def prune_spec(cfg: RunConfig, use_gpu: bool = False) -> GroupSpec:
    """The pruning workers' group for ``cfg.backend`` (NCCL on GPUs, gloo on CPUs), joined through DeepSpeed."""
    b = cfg.backend
    return GroupSpec(b.workers, use_gpu=use_gpu, backend="nccl" if use_gpu else "gloo", field="backend.workers",
                     address=b.address, strategy=b.placement_strategy, num_threads=b.num_threads, deepspeed=True,
                     collective_timeout_s=b.collective_timeout_s, tf32=b.tf32, placement_wait_s=b.capacity_wait_s)


def start_workers(spec: GroupSpec) -> ActorGroup:
    """Start the pruning workers of ``spec``."""
    return ActorGroup(PruneWorker, spec)


def run_ray(cfg: RunConfig, model_path: str, input_ids: torch.Tensor, progress: bool = True,
            group: ActorGroup | None = None, keep_grad_partitions: bool = False,
            checkpoint_dir: Path | None = None, faults: Faults | None = None,
            spec: GroupSpec | None = None, inputs: dict | None = None, shard_dir: Path | None = None) -> RayResult:
    """Prune with ``cfg.backend.workers`` Ray actors under DeepSpeed ZeRO-3.

    With a ``checkpoint_dir``, gradient-statistic partitions (every ``backend.checkpoint_every``
    sequences per rank) and every finished block are persisted; a failed attempt (a dead
    worker, a collective that timed out) tears the group down, starts a new one and resumes
    from the checkpoint, at most ``backend.max_retries`` times. A resumed run produces the
    same masks as an uninterrupted one.

    Args:
        cfg: the run config (``pruning``, ``model``, ``backend``).
        model_path: materialised model directory (readable by every worker).
        input_ids: ``(N, L)`` int64 calibration windows in global order.
        progress: show progress bars on the driver.
        group: an existing worker group to reuse for the first attempt (not shut down).
        keep_grad_partitions: also return each rank's statistic partitions in
            ``memory[r]["grad_partitions"]`` (tests).
        checkpoint_dir: where to keep phase checkpoints (None: no checkpoints, no retries).
        faults: fault injection (tests; default :meth:`Faults.from_env`).
        spec: the group to start (and restart after a failure); default :func:`prune_spec` on CPUs.
        inputs: the inputs fingerprint the checkpoints record and a resume must match
            (:func:`orchestrator.inputs.fingerprints.checkpoint_inputs` of the windows; computed here when None).
        shard_dir: where the ranks write the pruned checkpoint without a ``checkpoint_dir`` (storage every
            rank shares; default: a new temporary directory, enough on one machine).

    Returns:
        The :class:`RayResult`.

    Raises:
        UsageError: the checkpoint was made by another config or from other inputs (windows, model, libraries),
            or a rank cannot see the directory it must write into.
        RayPruneError: the run failed and the retries ran out (checkpoints are kept).
    """
    from orchestrator.errors import RayPruneError, UsageError

    faults = faults if faults is not None else Faults.from_env()
    store = open_store(cfg, checkpoint_dir, input_ids, inputs) if checkpoint_dir is not None else None
    if store is None and shard_dir is None:
        import tempfile

        shard_dir = Path(tempfile.mkdtemp(prefix="rayprune-shards-"))
    root = store.root if store is not None else Path(shard_dir)
    retries = cfg.backend.max_retries if store is not None else 0
    spec = spec or (group.spec if group is not None else prune_spec(cfg))
    attempt = 0
    while True:
        own = group is None
        t0 = time.perf_counter()
        try:
            if own:
                group = start_workers(spec) if attempt == 0 else restart_workers(spec, cfg, root)
            if store is not None:  # a failed call lets the survivors finish their block writes first
                group.on_failure = lambda g: settle_survivors(g, min(60.0, cfg.backend.collective_timeout_s))
            pending: dict[int, list[dict]] = {}  # rows of pruned blocks whose files are not committed yet
            result = _attempt(cfg, model_path, input_ids, progress, group, keep_grad_partitions, store, faults, t0,
                              root, pending)
            if own:
                group.shutdown()
            return result
        except (UsageError, KeyboardInterrupt, RayPruneError):
            if own and group is not None:
                group.shutdown()
            raise
        except Exception as exc:  # noqa: BLE001 - any worker failure: tear down, maybe resume
            if group is not None:
                group.kill()
            if store is not None:  # blocks written whose records did not reach the driver before the failure
                from actors.shard_writer import adopt_written

                for record in adopt_written(root, pending):
                    store.commit_block(record["index"], record, pending.pop(record["index"]))
            attempt += 1
            where = f"; checkpoints kept in {store.root}" if store is not None else ""
            if attempt > retries:
                raise RayPruneError(f"distributed run failed after {attempt} attempt(s): {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}{where}"
                                    + (" (continue with: rayprune prune --resume OUTPUT_DIR)" if store else "")
                                    ) from exc
            log.warning("attempt %d failed (%s: %s); restarting the worker group and resuming from %s", attempt,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", store.root)
            group = None


def restart_workers(spec: GroupSpec, cfg: RunConfig, root: Path) -> ActorGroup:
    """Start the group again after a failed attempt, waiting up to ``backend.capacity_wait_s`` for its placement.

    A lost node lowers the cluster's total until KubeRay or the autoscaler replaces it, so the first start's
    capacity check would refuse at once; the restart skips it and lets the placement group wait instead.

    Raises:
        RayPruneError: the workers could not be placed in time (one line; the checkpoints in ``root`` stay).
    """
    from orchestrator.errors import RayPruneError, UsageError

    wait = cfg.backend.capacity_wait_s
    log.warning("restarting %d workers; waiting up to %.0f s for their resources", spec.workers, wait)
    try:
        return start_workers(replace(spec, check_capacity=False, placement_wait_s=wait))
    except UsageError:
        raise RayPruneError(f"distributed run failed: {spec.workers} workers could not be placed again within "
                            f"{wait:g} s after a failure (backend.capacity_wait_s; a lost node was not replaced); "
                            f"checkpoints kept in {root} (continue with: rayprune prune --resume OUTPUT_DIR)"
                            ) from None


def settle_survivors(group: ActorGroup, timeout_s: float) -> None:
    """Let the ranks still alive finish their block writes in flight (at most ``timeout_s``), so a failed
    attempt keeps every block its ranks pruned; a dead or hung rank is skipped."""
    import ray

    refs = [a.settle_writes.remote() for a in group.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - a dead rank, or its write failed: nothing to keep from it
            log.debug("a rank could not settle its writes", exc_info=True)


def open_store(cfg: RunConfig, root: Path, input_ids: torch.Tensor, inputs: dict | None = None) -> CheckpointStore:
    """Open (or start) the checkpoint in ``root``; a resume must match the config and the inputs.

    Raises:
        UsageError: another config or other inputs made the checkpoint (one line naming what differs).
    """
    import yaml

    from orchestrator.errors import UsageError
    from orchestrator.inputs.fingerprints import checkpoint_inputs, inputs_mismatch, inputs_refusal

    inputs = inputs if inputs is not None else checkpoint_inputs(cfg.model, input_ids)
    try:
        store = CheckpointStore(root, cfg.work_fingerprint(), yaml.safe_dump(cfg.to_dict(), sort_keys=False), inputs)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from None
    what = inputs_mismatch(store.saved_inputs, inputs) if store.resumed else None
    if what:
        raise UsageError(inputs_refusal(store.root, what))
    store.clean()  # versions no commit names (a save interrupted before its commit)
    return store


def _attempt(cfg: RunConfig, model_path: str, input_ids: torch.Tensor, progress: bool, group: ActorGroup,
             keep_grad_partitions: bool, store: CheckpointStore | None, faults: Faults | None, t0: float,
             root: Path, pending: dict[int, list[dict]]) -> RayResult:
    """One attempt on a live group, continuing from ``store``'s progress; the ranks write under ``root``."""
    cfg = cfg.with_compute_dtypes(group.native_bf16)
    pcfg = cfg.pruning
    if store is not None and not store.world_matches(group.workers):
        raise ValueError(f"checkpoint {store.root} was written by {store.progress['world']} workers, "
                         f"not {group.workers}")
    check_shared_storage(group, root, cfg.output.dir)
    if store is not None:
        store.clean()  # an earlier attempt's uncommitted block files (no rank writes now)
    load_workers(group, cfg, model_path, input_ids)
    phases = {"startup": time.perf_counter() - t0}
    if gradient_kinds(pcfg.method, pcfg.gblm.norm):
        t1 = time.perf_counter()
        n = int(input_ids.shape[0])
        gradient_pass(group, n, gradient_spec(cfg, model_path, group, n=n), progress, store,
                      cfg.backend.checkpoint_every, faults, cfg.backend.checkpoint_interval_s)
        phases["gradient_pass"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    outcome, files = _block_pass(group, cfg, progress, root, pending, store, faults)
    phases["block_pass"] = time.perf_counter() - t1
    outcome.phases = phases
    outcome.dtypes = cfg.compute_dtypes()
    memory = group.execute("memory")
    if keep_grad_partitions:
        for m, parts in zip(memory, group.execute("grad_partitions"), strict=True):
            m["grad_partitions"] = parts
    group.execute("finish")
    return RayResult(outcome=outcome, root=root, files=files, memory=memory)


def check_shared_storage(group: ActorGroup, root: Path, field_value: str) -> None:
    """Every rank must see ``root`` as the driver does (:mod:`actors.storage`), before anything is loaded.

    Raises:
        UsageError: one line naming ``output.dir`` and the nodes whose ranks cannot see it.
    """
    from actors.storage import blind_ranks, driver_probe
    from orchestrator.errors import UsageError

    token = driver_probe(root)
    answers = group.get([a.probe_storage.remote(str(root), token) for a in group.actors])
    bad = blind_ranks(root, token, answers)
    if bad:
        nodes = sorted({f"{a['node']} (rank {a['rank']}{': ' + a['error'] if a['error'] else ''})" for a in bad})
        raise UsageError(f"output.dir: {field_value!r} is not storage every node shares (its checkpoint directory "
                         f"{str(root)!r} is not visible from {', '.join(nodes)}); put it on a filesystem every "
                         "node mounts")


def load_workers(group: ActorGroup, cfg: RunConfig, model_path: str, input_ids: torch.Tensor) -> None:
    """Every worker loads its ZeRO-3 partitions and its calibration shard (through the object store)."""
    import ray

    shards = [ray.put(b) for b in shard_bytes(input_ids, group.workers)]
    seq_len = int(input_ids.shape[1])
    group.get([a.load.remote(model_path, cfg.model, s, seq_len) for a, s in zip(group.actors, shards, strict=True)])


def _block_pass(group: ActorGroup, cfg: RunConfig, progress: bool, root: Path, rows: dict[int, list[dict]],
                store: CheckpointStore | None = None, faults: Faults | None = None) -> tuple[PruneOutcome, dict]:
    """Prune all blocks in order; every rank scores its share of each block and the ranks write the pruned
    checkpoint under ``root`` themselves. Only report rows and file records come back here.

    Blocks already in ``store`` are replayed (each rank reads the block's file, writes the weights back and
    advances its hidden states) instead of pruned again. Block ``i``'s file record arrives with block
    ``i + 1``'s answers (written meanwhile) and is committed then; ``rows`` keeps the report rows of the
    blocks not committed yet (the caller commits what a failed attempt finished writing).

    Returns:
        The outcome (report rows) and the written files (relative path -> record).
    """
    import ray

    pcfg = cfg.pruning
    out = PruneOutcome()
    files: dict[str, dict] = {} if store is None else dict(store.shard_files())
    if store is None or not store.outside_done:
        record = group.execute("write_outside", str(root))[0]
        _take(record, files, store, "outside")
    if uses_activations(pcfg):
        group.execute("capture")
    blocks = group.execute_single(0, "num_blocks")
    probes = None
    if pcfg.allocation == "owl":
        probes = [group.execute("probe_block", i, cfg.backend.forward_dtype, pcfg.owl.threshold)[0]
                  for i in tqdm(range(blocks), desc=f"OWL probe (ray x{group.workers})", disable=not progress)]
        group.execute("restart_hidden")
    cfgs = block_configs(pcfg, probes, blocks)
    kinds = gradient_kinds(pcfg.method, pcfg.gblm.norm)
    grad_kind = kinds[0] if kinds else None
    done = store.blocks_done if store is not None else 0
    for i in tqdm(range(blocks), desc=f"{pcfg.method} blocks (ray x{group.workers})", disable=not progress):
        if i < done:
            path, sha = store.block_tensors(i)
            group.execute("replay_block", i, path, sha, cfgs[i], cfg.backend.forward_dtype)
            out.layers.extend(store.block_rows(i))
            continue
        if faults is not None and faults.take("kill_at_block", i):
            ray.kill(group.actors[-1])
        if faults is not None and faults.take("hang_at_block", i):
            group.actors[-1].hang.remote(faults.hang_seconds)
        answers = group.execute("prune_block", i, cfgs[i], cfg.backend.forward_dtype, grad_kind, str(root))
        rows[i] = sorted((r for a in answers for r in a["rows"]), key=lambda r: answers[0]["order"][r["name"]])
        out.layers.extend(rows[i])
        for a in answers:
            _take(a["written"], files, store, "block", rows)
    for record in sorted((r for r in group.execute("settle_writes") if r), key=lambda r: r["index"]):
        _take(record, files, store, "block", rows)
    return out, files


def _take(record: dict | None, files: dict[str, dict], store: CheckpointStore | None, kind: str,
          rows: dict[int, list[dict]] | None = None) -> None:
    """Record (and with a store, commit) the files a rank reported written."""
    if record is None:
        return
    for rel, entry in record["files"].items():
        files[rel] = {"path": rel, **entry}
    if store is None:
        return
    if kind == "outside":
        store.commit_outside(record)
    else:
        store.commit_block(record["index"], record, rows.pop(record["index"]))
