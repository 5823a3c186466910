"""The one actor group: N actors in a placement group, ranked by node then accelerator, optionally
joined into one ``torch.distributed`` process group.

Pruning workers, evaluation actors and recovery actors are all :class:`GroupMember` subclasses
driven through :class:`ActorGroup` (in the manner of Ray Train's worker group):

* one bundle per actor (``{"GPU": 1, "CPU": 1}`` on a GPU cluster, ``{"CPU": 1}`` otherwise);
* every actor reports its node and the accelerator ids Ray assigned, once;
* ranks are ordered by node, then by accelerator id; the local rank is the position among the
  group's actors on the same node;
* on GPUs the group's accelerators of a node are made visible to each of its actors
  (``CUDA_VISIBLE_DEVICES``, before CUDA is touched) so that the device index of an actor
  (the position of its own accelerator in that list) equals its local rank, which is what
  DeepSpeed and NCCL read from ``LOCAL_RANK``. It never comes from counting actors;
* the caller (the coordinator) chooses the process-group backend: ``nccl`` on GPUs, ``gloo``
  on CPUs, or none for independent actors;
* ``execute`` / ``execute_async`` / ``execute_single`` call a method on all actors or on one;
  a failing actor fails the whole step at once (the others are stuck in a collective).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.cluster import check_capacity, ensure_ray, node_cpus
from actors.memory import TRACE_MEMORY_ENV
from orchestrator.engine.device import (
    NATIVE_BF16_ENV,
    device_memory_bytes,
    local_device,
    native_bf16,
    visible_device_index,
)
from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: the name prefix of the placement groups this process creates (see ``orchestrator.groups.named_placement``)
PLACEMENT_PREFIX_ENV = "RAYPRUNE_PLACEMENT_PREFIX"
BACKENDS = ("nccl", "gloo")
TF32_ENV = "RAYPRUNE_TF32"  # 1: the actors let fp32 matmuls use TF32 (``backend.tf32``)


@dataclass(frozen=True)
class GroupSpec:
    """How to start a group (chosen by the coordinator).

    Attributes:
        workers: number of actors.
        use_gpu: one GPU per actor (else CPU actors).
        backend: ``nccl``, ``gloo`` or None (independent actors, no process group).
        field: the config key named in capacity and placement errors.
        address: Ray address (None: the running Ray, or a local one).
        strategy: placement strategy.
        num_threads: torch threads per actor (0: the CPUs Ray declares for the actor's node divided among the
            group's actors on that node, at least 1).
        deepspeed: join through ``deepspeed.init_distributed`` (ZeRO-3 workers) instead of torch.
        tf32: let the actors' fp32 matmuls use TF32 (``backend.tf32``).
        gpu_fraction: share of a GPU per actor (< 1: several ranks on one GPU, as the GPU suite tries).
        collective_timeout_s: a collective whose peer stopped participating fails after this long.
        shutdown_timeout_s: graceful shutdown wait before the actors are killed.
        placement_wait_s: how long the placement group may stay pending before the start fails.
        check_capacity: compare the workers with the cluster's current total first (a restart after a lost
            node skips it: the total is low until the node is replaced, and the group waits instead).
    """

    workers: int
    use_gpu: bool = False
    backend: str | None = "gloo"
    field: str = "backend.workers"
    address: str | None = None
    strategy: str = "PACK"
    num_threads: int = 0
    deepspeed: bool = False
    collective_timeout_s: float = 1800.0
    shutdown_timeout_s: float = 30.0
    tf32: bool = False
    gpu_fraction: float = 1.0
    placement_wait_s: float = 120.0
    check_capacity: bool = True


@dataclass(frozen=True)
class MemberInfo:
    """Where one actor runs, as Ray assigned it."""

    node_id: str
    node_ip: str
    accelerator_ids: tuple[str, ...]


@dataclass(frozen=True)
class RankInfo:
    """One actor's place in the group."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    visible_devices: str | None  # the CUDA_VISIBLE_DEVICES the actor gets (None: left as Ray set it)


def order_ranks(infos: list[MemberInfo]) -> tuple[list[int], list[RankInfo]]:
    """Ranks ordered by node (in order of first appearance), then accelerator id.

    Returns:
        ``(order, ranks)``: ``order[r]`` is the index into ``infos`` of rank ``r``; ``ranks[r]``
        its place in the group (GPU actors: the node's accelerators, sorted, as visible devices).
    """
    nodes: dict[str, int] = {}
    for info in infos:
        nodes.setdefault(info.node_id, len(nodes))

    def key(i: int) -> tuple:
        ids = infos[i].accelerator_ids
        return nodes[infos[i].node_id], (int(ids[0]) if ids and ids[0].isdigit() else -1), i

    order = sorted(range(len(infos)), key=key)
    ranks = []
    for r, i in enumerate(order):
        peers = [j for j in order if infos[j].node_id == infos[i].node_id]
        visible = None
        if infos[i].accelerator_ids:
            ids = [a for j in peers for a in infos[j].accelerator_ids]
            visible = ",".join(dict.fromkeys(ids))  # once each: actors sharing a GPU name it twice
        ranks.append(RankInfo(r, len(infos), peers.index(i), len(peers), visible))
    return order, ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class _ExpectedDeepSpeedWarnings(logging.Filter):
    """The gradient engine's never-stepped ``SGD(lr=0)`` is untested by DeepSpeed on purpose (see zero3.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def quiet_worker_logs() -> None:
    """Actors report warnings and errors only (``RAYPRUNE_WORKER_LOG_LEVEL=INFO`` for their timings);
    the driver shows one progress bar per long phase, so the libraries' own bars are off here."""
    level = os.environ.get("RAYPRUNE_WORKER_LOG_LEVEL", "WARNING").upper()
    for name in ("", "DeepSpeed", "transformers", "datasets"):
        logging.getLogger(name).setLevel(level)
    ds_log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ExpectedDeepSpeedWarnings) for f in ds_log.filters):
        ds_log.addFilter(_ExpectedDeepSpeedWarnings())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity(logging.getLevelName(level))
    except (ImportError, AttributeError, ValueError):
        pass


class GroupMember:
    """Base class of every actor an :class:`ActorGroup` runs: placement, rank, device, process group.

    Subclasses own their resources (a model shard, a model copy, adapters) and decide nothing.
    """

    def __init__(self, num_threads: int = 1) -> None:
        self.num_threads = num_threads  # 0: decided in setup, from this node's CPUs and this group's actors on it
        torch.set_num_threads(max(1, num_threads))
        # DeepSpeed still calls torch.distributed's renamed collectives; one warning per call site per
        # worker would flood the driver's log (the source is the dependency, not this code)
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        quiet_worker_logs()
        self.rank, self.world, self.local_rank, self.local_world = 0, 1, 0, 1
        self.device = torch.device("cpu")

    def member_info(self) -> MemberInfo:
        """The node and the accelerators Ray assigned to this actor (CUDA is not touched)."""
        ctx = ray.get_runtime_context()
        ids = tuple(str(a) for a in ctx.get_accelerator_ids().get("GPU", []))
        return MemberInfo(ctx.get_node_id(), ray.util.get_node_ip_address(), ids)

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a free port on it (rank 0's rendezvous)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, place: RankInfo, master: str, port: int, backend: str | None, deepspeed: bool = False,
              timeout_s: float = 1800.0) -> dict:
        """Take this actor's rank and device, and join the process group (collective when ``backend``).

        Returns:
            :meth:`device_info`.
        """
        self.rank, self.world, self.local_rank = place.rank, place.world, place.local_rank
        self.local_world = place.local_world
        ids = list(self.member_info().accelerator_ids)
        if place.visible_devices is not None:  # before anything initialises CUDA in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = place.visible_devices
        self.device_index = visible_device_index(ids, place.visible_devices) if ids else None
        local = place.local_rank if self.device_index is None else self.device_index  # DeepSpeed's device ordinal
        os.environ.update({"MASTER_ADDR": master, "MASTER_PORT": str(port), "RANK": str(place.rank),
                           "WORLD_SIZE": str(place.world), "LOCAL_RANK": str(local),
                           "LOCAL_WORLD_SIZE": str(place.local_world), "LOCAL_SIZE": str(place.local_world)})
        self.device = local_device(ids)
        if not self.num_threads:  # the node's CPUs as Ray declares them (a pod's limit), shared by its members
            torch.set_num_threads(max(1, node_cpus(self.member_info().node_id) // max(1, place.local_world)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if os.environ.get(TF32_ENV) == "1":  # forwards and SparseGPT; statistics stay fp32 (exact_fp32)
                torch.set_float32_matmul_precision("high")
                torch.backends.cudnn.allow_tf32 = True
        if backend is not None:
            self._join(backend, deepspeed, timeout_s)
        return self.device_info()

    def _join(self, backend: str, deepspeed: bool, timeout_s: float) -> None:
        timeout = timedelta(seconds=timeout_s)
        if deepspeed:
            import deepspeed as ds

            quiet_worker_logs()  # DeepSpeed sets its own logger's level on import
            ds.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, rank=self.rank,
                                world_size=self.world, timeout=timeout)
            self._unlink_shm_segment()
        else:
            import torch.distributed as dist

            dist.init_process_group(backend, init_method=f"tcp://{os.environ['MASTER_ADDR']}:"
                                    f"{os.environ['MASTER_PORT']}", rank=self.rank, world_size=self.world,
                                    timeout=timeout)

    def _unlink_shm_segment(self) -> None:
        """Unlink the shared-memory segment DeepSpeed's CPU all-reduce created for this rank.

        DeepSpeed maps one ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
        segment (69 MB) per rank and never unlinks it, so every CPU run left its segments behind
        until the machine ran out of memory. Once every rank has mapped every peer's segment (the
        barrier), the names are not needed: unlinking them now frees the memory when the last process
        that maps it exits, however it exits.
        """
        import torch.distributed as dist

        dist.barrier()
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{self.rank}")
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:
            pass  # no segment: not the CPU all-reduce (GPUs, or ranks on several nodes)

    def device_info(self) -> dict:
        """Rank, local rank, device and the accelerators behind it (for logs and tests)."""
        info = self.member_info()
        return {"rank": self.rank, "world": self.world, "local_rank": self.local_rank, "node_id": info.node_id,
                "accelerator_ids": list(info.accelerator_ids), "device": str(self.device),
                "device_index": getattr(self, "device_index", None),
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "memory_bytes": device_memory_bytes(self.device, self.local_world),
                "native_bf16": native_bf16(self.device), "threads": torch.get_num_threads()}

    def leave(self) -> None:
        """Destroy the process group (subclasses free their resources first)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class ActorGroup:
    """``spec.workers`` actors of ``actor_cls``, one per placement-group bundle, in rank order.

    Args:
        actor_cls: a :class:`GroupMember` subclass (wrapped with ``ray.remote`` here).
        spec: how many, on which resources, joined how.

    Raises:
        UsageError: the cluster is too small, or the bundles cannot be placed.
    """

    def __init__(self, actor_cls: type[GroupMember], spec: GroupSpec) -> None:
        if spec.strategy not in STRATEGIES:
            raise UsageError(f"placement strategy {spec.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if spec.backend is not None and spec.backend not in BACKENDS:
            raise UsageError(f"process-group backend {spec.backend!r}: expected one of {', '.join(BACKENDS)}")
        ensure_ray(spec.address)
        if spec.check_capacity:
            check_capacity(spec.workers, spec.field)
        self.spec = spec
        #: called with the group when a call fails, before the group is killed (best effort)
        self.on_failure: Callable[[ActorGroup], None] | None = None
        self.workers = spec.workers
        self.actors: list = []
        bundle = {"GPU": spec.gpu_fraction, "CPU": 1} if spec.use_gpu else {"CPU": 1}
        # a supervisor (the job service) names its job's groups, so it can free them if the job is killed
        name = f"{os.environ.get(PLACEMENT_PREFIX_ENV, '')}{uuid.uuid4().hex[:8]}"
        self.pg = placement_group([dict(bundle) for _ in range(spec.workers)], strategy=spec.strategy, name=name)
        try:
            ray.get(self.pg.ready(), timeout=spec.placement_wait_s)
        except Exception:
            remove_placement_group(self.pg)
            self.pg = None
            raise UsageError(f"{spec.field}: {spec.workers} workers cannot be placed with strategy "
                             f"{spec.strategy} within {spec.placement_wait_s:g} s") from None
        threads = spec.num_threads  # 0: each actor takes its node's share once it knows its place (setup)
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if not spec.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        if spec.tf32:
            env[TF32_ENV] = "1"
        for name in (NATIVE_BF16_ENV, TRACE_MEMORY_ENV):  # the driver's settings reach actors on every node
            if os.environ.get(name):
                env[name] = os.environ[name]
        remote = ray.remote(actor_cls)
        actors = [
            remote.options(
                num_cpus=1, num_gpus=spec.gpu_fraction if spec.use_gpu else 0, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=i),
            ).remote(threads)
            for i in range(spec.workers)
        ]
        self.actors = actors
        try:
            self.infos = self.get([a.member_info.remote() for a in actors])
            order, self.ranks = order_ranks(self.infos)
            self.actors = [actors[i] for i in order]
            self.infos = [self.infos[i] for i in order]
            master, port = ray.get(self.actors[0].rendezvous.remote())
            self.devices = self.get([a.setup.remote(r, master, port, spec.backend, spec.deepspeed,
                                                    spec.collective_timeout_s)
                                     for a, r in zip(self.actors, self.ranks, strict=True)])
        except BaseException:
            self.shutdown()
            raise
        log.info("%s: %d %s actors (%s) on %d node(s)", spec.field, spec.workers, actor_cls.__name__,
                 spec.backend or "no process group", len({i.node_id for i in self.infos}))

    @property
    def native_bf16(self) -> bool:
        """Whether every member's device computes bf16 natively (what ``auto`` compute dtypes resolve with)."""
        return all(d.get("native_bf16", False) for d in self.devices)

    def get(self, refs: list) -> list:
        """``ray.get`` that fails fast: the first actor error kills the whole group and is raised."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception:
                if self.on_failure is not None:
                    try:
                        self.on_failure(self)  # e.g. let the survivors finish their writes in flight
                    except Exception:  # noqa: BLE001 - the original failure is the one to raise
                        log.warning("the group's failure hook failed", exc_info=True)
                self.kill()
                raise
        return ray.get(refs)

    def execute_async(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Start ``method`` on every actor; the object refs in rank order."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def execute(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``method`` on every actor at once (collective) and wait for all results (rank order)."""
        return self.get(self.execute_async(method, *args, **kwargs))

    def execute_single_async(self, rank: int, method: str, *args: Any, **kwargs: Any):
        """Start ``method`` on the actor of ``rank``; its object ref."""
        return getattr(self.actors[rank], method).remote(*args, **kwargs)

    def execute_single(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the actor of ``rank`` and wait."""
        return self.get([self.execute_single_async(rank, method, *args, **kwargs)])[0]

    def kill(self) -> None:
        """Tear the group down at once (a hung collective never answers a graceful leave)."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def shutdown(self) -> None:
        """Leave the process group gracefully, kill the actors after a timeout, free the placement group."""
        refs = [a.leave.remote() for a in self.actors]
        if refs:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.spec.shutdown_timeout_s)
            if pending:
                log.warning("%s: %d actors did not shut down in %.0fs", self.spec.field, len(pending),
                            self.spec.shutdown_timeout_s)
        self.kill()

    def __enter__(self) -> ActorGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
