"""The ``PruneWorker`` actor: owns a ZeRO-3 model shard and a calibration data shard.

It runs what the coordinator asks, in lock-step with the other workers (every call
that touches the model is collective), and decides no policy: scoring and masks come
from :mod:`orchestrator.pruning` through the one block step (:mod:`orchestrator.engine.block_step`).
Every tensor it makes or receives lives on its device (:attr:`GroupMember.device`); what it hands
back to the driver is on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from actors.block_ops import BlockPassOps
from actors.group import GroupMember
from actors.memory import PhaseMemory, trim_heap
from orchestrator.engine.device import Placement, to_cpu

log = logging.getLogger(__name__)


def read_shard(shard: bytes) -> tuple[torch.Tensor, list[int]]:
    """Read one worker's Arrow shard (the IPC file's bytes, from the object store).

    Returns:
        ``(n, L)`` int64 ids and their global positions.
    """
    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader(shard)).read_all()
    positions = table.column("position").to_pylist()
    rows = table.column("input_ids").to_pylist()
    ids = torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros((0, 0), dtype=torch.int64)
    return ids, positions


class PruneWorker(BlockPassOps, GroupMember):
    """One rank of the distributed pruning job (run by an :class:`~actors.group.ActorGroup`)."""

    def __init__(self, num_threads: int = 1) -> None:
        super().__init__(num_threads)
        self.mem = PhaseMemory(self.device)  # resident and allocated bytes per phase: load, gradient and block pass
        self.seconds: dict[str, float] = {}  # where the last gradient pass spent its time
        self._reset()

    def _reset(self) -> None:
        self.model = None
        self.engine = None
        self.dschf = None
        self.grads = None
        self.emb_handle = None
        self.ids = torch.zeros((0, 0), dtype=torch.int64)
        self.hidden = self.hidden0 = None
        self.kwargs: dict = {}
        self.prefix = ""
        self.recomputed = 0  # block forwards the gradient pass's backward recomputed (activation checkpointing)
        self.grad_local: list[int] = []  # local indices of the gradient pass's sequences
        self.scored = 0  # weights this rank scored and pruned in the block pass (its share of every block)
        self.load_io: dict[str, float] = {}  # bytes this rank read from the checkpoint, and how long it took
        # where this run's tensors lived: parameter partitions, statistic partitions, masks (the GPU suite checks)
        self.devices: dict[str, set[str]] = {"parameters": set(), "statistics": set(), "masks": set()}
        if getattr(self, "shards", None) is not None:
            self.shards.close()
        self.shards = None  # this rank's block writes (:class:`~actors.shard_writer.ShardWriter`)
        gc.collect()

    def leave(self) -> None:
        """Free the model and destroy the process group."""
        self.finish()
        self.mem.close()
        super().leave()

    # ------------------------------------------------------------ one run

    def load(self, model_path: str, model_cfg: Any, shard: bytes, seq_len: int) -> dict[str, int]:
        """Load the model partitioned under ZeRO-3 and this rank's calibration shard (collective)."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from actors.loading import STATS_REDUCE_BUCKET, ds_config, load_zero3, model_limits
        from orchestrator.engine.blocks import block_prefix

        self.finish()
        if self.mem.device != self.device:  # the rank's device is known once it joined its group
            self.mem.close()
            self.mem = PhaseMemory(self.device)
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        with contextlib.suppress(KeyError):  # imports the model's code before "start" (remote code: at load)
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        self.mem.clear()
        self.mem.mark("start")  # before this run's tensors: what the planner's bytes are measured from
        self.mem.begin("load")
        ids, self.positions = read_shard(shard)
        self.ids = ids.to(self.device)  # (n, L)
        self.seq_len = seq_len
        self.model_cfg = model_cfg
        self.ds_cfg = ds_config(self.world, STATS_REDUCE_BUCKET, model_limits(config, model_cfg.dtype, self.device))
        self.model, self.dschf, self.load_io = load_zero3(model_path, model_cfg, self.ds_cfg, self.rank, self.world)
        self.config = self.model.config
        self.devices["parameters"] = {str(p.ds_tensor.device) for p in self.model.parameters()}
        self.prefix = block_prefix(self.model)
        trim_heap()  # the loading's transients (whole modules before partitioning, read buffers) leave the heap
        self.mem.end("load")
        self.mem.mark("loaded")
        return {"samples": int(self.ids.shape[0])}

    def _local_rows(self, steps: int, first: int = 0, count: int | None = None) -> list[tuple[torch.Tensor, float]]:
        """``steps`` sequences ``(1, L)``: the gradient pass's own sequences ``first .. first+count`` (default: all;
        of the whole shard, or of the rows ``spec.rows`` selects) with weight 1, then padding dummies with weight 0."""
        mine = self.grad_local
        own = mine[first : len(mine) if count is None else first + count]
        rows = [(self.ids[j : j + 1], 1.0) for j in own][:steps]
        dummy = (self.ids[:1] if self.ids.shape[0]
                 else torch.zeros((1, self.seq_len), dtype=torch.int64, device=self.device))
        return rows + [(dummy, 0.0)] * (steps - len(rows))

    def start_gradients(self, spec: Any, resume: tuple[str, str] | None = None) -> None:
        """Create the ZeRO-3 engine and the sharded gradient statistics of ``spec`` (collective).

        Only one tiny parameter (the smallest one outside the pruned set, a norm weight) is
        trainable, because ``engine.backward`` needs an optimizer; the statistics come from
        module hooks, so ZeRO never buckets or averages the big weights' gradients. The
        embedding output is made to require grad so the backward reaches every block. The
        engine wraps the decoder only (:class:`~actors.zero3.Decoder`) when the head is a plain
        matmul: the loss then comes from the hidden states without logits, as in the local engine.

        Args:
            spec: the :class:`~actors.gradient_pass.GradientPassSpec` the coordinator chose (statistics, scale,
                autocast dtype, activation checkpointing, offloaded partitions).
            resume: ``(path, sha256)`` of this rank's saved partitions to continue from.
        """
        from actors.zero3 import Decoder, ShardedGradStats, full_shape, make_engine
        from orchestrator.engine.local import logits_free, pruned_weight_names

        self.mem.begin("gradient_pass")
        t0 = time.perf_counter()
        names = pruned_weight_names(self.model)
        # the loss without logits (as the local engine computes it) unless the head is more than a matmul
        self.chunked_loss = logits_free(self.model)
        wrapped = Decoder(self.model) if self.chunked_loss else self.model
        pruned = {id(p) for n, p in self.model.named_parameters() if n in set(names)}
        rest = [(math.prod(full_shape(p)), n) for n, p in wrapped.named_parameters() if id(p) not in pruned]
        self.engine = make_engine(wrapped, self.ds_cfg, {min(rest)[1]})
        mods = dict(self.model.named_modules())
        self.grad_place = Placement.of(self.device, spec.dtype)
        self.grads = ShardedGradStats({n: mods[n.removesuffix(".weight")] for n in names}, spec.kinds, spec.scale,
                                      self.device, compute_dtype=self.grad_place.autocast_dtype or torch.float32,
                                      offload=spec.offload, probe=self.mem.sample)
        self.devices["statistics"] = {str(t.device) for d in self.grads.chunks.values() for t in d.values()}
        if resume is not None:
            from actors.checkpoint import load_tensors

            saved = load_tensors(Path(resume[0]), resume[1])
            for n, by_kind in self.grads.chunks.items():
                for k, buf in by_kind.items():
                    buf.copy_(saved[f"{n}::{k}"].to(buf.device))
        self.recompute_blocks = spec.checkpoint
        rows = None if spec.rows is None else set(spec.rows)
        self.grad_local = [j for j, p in enumerate(self.positions) if rows is None or p in rows]  # local indices
        self.pass_seconds = {"forward": 0.0, "backward": 0.0, "start": time.perf_counter() - t0}
        emb = self.model.get_input_embeddings()
        self.emb_handle = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
        self.mem.mark("engine")

    def gradient_steps(self, start: int, count: int, batch: int = 1) -> int:
        """Forward/backward local sequences ``start .. start+count`` (padded with dummies), ``batch`` at a time.

        Each sequence's loss is its own mean token loss (the batch loss times ``B``: all windows
        have the same length), so the per-sample gradients equal batch-1 gradients.
        """
        return self._step_rows(self._local_rows(start + count)[start:], batch)

    def gradient_range(self, lo: int, hi: int, steps: int, batch: int = 1) -> int:
        """Forward/backward this rank's sequences at global positions ``[lo, hi)``, padded with dummies to
        ``steps`` (every rank runs the same number of backwards), ``batch`` at a time."""
        mine = [j for j, p in enumerate(self.positions) if lo <= p < hi]  # contiguous, as the shard is
        return self._step_rows(self._local_rows(steps, mine[0] if mine else 0, len(mine)), batch)

    def _step_rows(self, rows: list[tuple[torch.Tensor, float]], batch: int) -> int:
        """Forward/backward ``rows`` (weight 0: a padding dummy) ``batch`` at a time; returns how many."""
        from actors.zero3 import head_loss
        from orchestrator.engine.checkpointing import checkpointed_blocks

        for lo in range(0, len(rows), max(1, batch)):
            part = rows[lo : lo + max(1, batch)]
            ids = torch.cat([r[0] for r in part])  # (B, L)
            self.grads.set_batch(torch.tensor([r[1] for r in part], device=self.device))
            t0 = time.perf_counter()
            with checkpointed_blocks(self.model, self.recompute_blocks) as recomputes:
                with self.grad_place.autocast():
                    if self.chunked_loss:
                        loss = head_loss(self.model, self.engine(ids), ids)  # (B, T, H) -> sum of sequence means
                    else:
                        loss = self.engine(ids, labels=ids, use_cache=False).loss * ids.shape[0]
                t1 = time.perf_counter()
                self.engine.backward(loss)
            self.grads.flush()
            self.recomputed += recomputes.count
            self.pass_seconds["forward"] += t1 - t0
            self.pass_seconds["backward"] += time.perf_counter() - t1
        return len(rows)

    def group_scores(self, table: list, estimators: list[str], minibatch: bool) -> list[torch.Tensor]:
        """SAAP group scores of ``table``'s tensors (:func:`actors.zero3.rank_group_sums`, collective):
        of the mini-batch since the last call (``minibatch``; then folded into the totals), or of the totals."""
        from actors.zero3 import rank_group_sums

        stats = self.grads.chunks if minibatch else self.grads.totals
        out = rank_group_sums(dict(self.model.named_parameters()), stats, table, estimators, self.device)
        if minibatch:
            self.grads.end_minibatch()
        return out

    def save_gradients(self, path: str, exit_after: bool = False) -> str:
        """Atomically save this rank's statistic partitions; returns the file's SHA-256.

        Args:
            path: the new version's file the driver chose
                (:meth:`~actors.checkpoint.CheckpointStore.grad_path`); the driver commits it.
            exit_after: fault injection (tests): end this process right after the file is written,
                before the driver can commit it.
        """
        from actors.checkpoint import save_tensors

        flat = {f"{n}::{k}": t.cpu() for n, d in self.grads.chunks.items() for k, t in d.items()}
        sha = save_tensors(Path(path), flat)
        if exit_after:
            log.warning("rank %d: fault injection: exiting after writing %s, before its commit", self.rank, path)
            os._exit(1)
        return sha

    def probe_storage(self, root: str, token: str) -> dict:
        """This rank's half of the shared-storage check (:func:`actors.storage.rank_probe`)."""
        from actors.storage import rank_probe

        return rank_probe(root, token, self.rank)

    def hang(self, seconds: float) -> None:
        """Fault injection (tests): stop participating for ``seconds``."""
        time.sleep(seconds)

    def end_gradients(self) -> int:
        """Remove the hooks; returns the bytes of this rank's statistic partitions."""
        t0 = time.perf_counter()
        self.grads.remove()
        log.info("rank %d gradient pass: forward %.1f s, backward %.1f s (of which hooks: %.1f s per-sample "
                 "statistics, %.1f s reduce-scatter)", self.rank, self.pass_seconds["forward"],
                 self.pass_seconds["backward"], self.grads.seconds["statistics"], self.grads.seconds["reduce_scatter"])
        if self.emb_handle is not None:
            self.emb_handle.remove()
            self.emb_handle = None
        self.mem.mark("gradient_pass")
        self.mem.end("gradient_pass")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._drop_engine()  # its optimizer partitions and buckets are not needed any more
        self.mem.mark("engine_freed")
        self.seconds = {**self.pass_seconds, **self.grads.seconds, "end": time.perf_counter() - t0,
                        "sampling": self.mem.sampling_seconds}  # the memory sampler's time so far
        return self.grads.nbytes()

    def _drop_engine(self) -> None:
        """Destroy the DeepSpeed engine (the partitioned model stays) and hand freed memory back."""
        if self.engine is not None:
            try:
                self.engine.destroy()
            except Exception:  # noqa: BLE001 - best effort cleanup
                log.debug("engine.destroy failed", exc_info=True)
            self.engine = None
        trim_heap()

    def memory(self) -> dict[str, int]:
        """This rank's parameter-partition and gradient-statistic bytes, and its memory by phase
        (:meth:`actors.memory.PhaseMemory.report`: resident set and allocated bytes, absolute)."""
        from actors.zero3 import partition_bytes

        return {
            "rank": self.rank,
            "model_state_bytes": partition_bytes(self.model) if self.model is not None else 0,
            "grad_stat_bytes": self.grads.nbytes() if self.grads is not None else 0,
            "recomputed_blocks": self.recomputed,
            **self.mem.report(),
            "gradient_pass_seconds": dict(self.seconds),
            "scored_weights": self.scored,
            "load_read_bytes": int(self.load_io.get("read_bytes", 0)),
            "load_tensor_bytes": int(self.load_io.get("tensor_bytes", 0)),
            "load_seconds": round(float(self.load_io.get("seconds", 0.0)), 3),
            "devices": {k: sorted(v) for k, v in self.devices.items()},
        }

    def grad_partitions(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's raw statistic partitions, on the CPU (for tests)."""
        return {} if self.grads is None else to_cpu(self.grads.chunks)

    def finish(self) -> None:
        """Drop the model, engine and shards of the current run."""
        self._drop_engine()
        self._reset()
