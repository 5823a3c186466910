"""The ``PruneWorker`` actor: owns a ZeRO-3 model shard and a calibration data shard.

It runs what the coordinator asks, in lock-step with the other workers (every call
that touches the model is collective), and decides no policy: scoring and masks come
from :mod:`orchestrator.pruning` through the one block step (:mod:`orchestrator.engine.block_step`).
Every tensor it makes or receives lives on its device (:attr:`GroupMember.device`); what it hands
back to the driver is on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from actors.group import GroupMember
from actors.memory import PhaseMemory
from orchestrator.engine.device import Placement, to_cpu

log = logging.getLogger(__name__)


def _answer(results: dict, linears: dict, full: dict[str, str]) -> dict:
    """The scorer's answer for one pruned block: masks, weights and report rows under full names, on the CPU."""
    from orchestrator.engine.local import layer_row

    return to_cpu({
        "masks": {full[n]: r.mask for n, r in results.items()},
        "weights": {full[n]: lin.weight.data for n, lin in linears.items()},
        "rows": [layer_row(full[n], r) for n, r in results.items()],
    })


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


def _load_model(model_path: str, model_cfg: Any, ds_cfg: dict, rank: int, world: int) -> tuple:
    """``(model, hf_ds_config, io)``: this rank's partitions read as checkpoint slices
    (:func:`actors.loading.load_own_partitions`), or ``from_pretrained`` under ZeRO-3 for checkpoints
    that cannot be sliced (pickle weights, renamed keys)."""
    from transformers.integrations import HfDeepSpeedConfig

    from actors.loading import load_own_partitions
    from actors.zero3 import load_partitioned

    dschf = HfDeepSpeedConfig(ds_cfg)  # must stay alive while the model is used
    loaded = load_own_partitions(model_path, model_cfg, dschf, rank, world)
    if loaded is not None:
        return loaded[0], dschf, loaded[1]
    log.warning("rank %d: %s cannot be read in slices (no safetensors, or renamed keys): every rank reads the "
                "whole checkpoint", rank, model_path)
    model, dschf = load_partitioned(model_path, model_cfg, ds_cfg)
    return model, dschf, {}


class PruneWorker(GroupMember):
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

        from actors.zero3 import STATS_REDUCE_BUCKET, ds_config
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
        self.ds_cfg = ds_config(self.world, STATS_REDUCE_BUCKET)
        self.model, self.dschf, self.load_io = _load_model(model_path, model_cfg, self.ds_cfg, self.rank, self.world)
        self.config = self.model.config
        self.prefix = block_prefix(self.model)
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
            spec: the :class:`~actors.distributed.GradientPassSpec` the coordinator chose (statistics, scale,
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
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def capture(self) -> int:
        """Block-0 inputs of this rank's sequences (local: a plain embedding shell, no ZeRO forwards)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from actors.zero3 import gather_outside_blocks_into, plain_construction
        from orchestrator.engine.blocks import capture_block_inputs
        from orchestrator.inputs.models import TORCH_DTYPES

        self.mem.begin("block_pass")  # open until :meth:`memory`
        shell_cfg = copy.deepcopy(self.config)
        shell_cfg.num_hidden_layers = 1  # the embeddings and one block, whose inputs are captured
        with plain_construction(self.dschf), no_init_weights():  # every weight used is gathered (0.5-1 s saved)
            shell = AutoModelForCausalLM.from_config(shell_cfg, dtype=TORCH_DTYPES[self.model_cfg.dtype]).eval()
        shell.lm_head = torch.nn.Identity()
        shell.to(self.device)
        gather_outside_blocks_into(self.model, shell, self.prefix)
        ids = self.ids if self.ids.shape[0] else torch.zeros((1, self.seq_len), dtype=torch.int64, device=self.device)
        hidden, self.kwargs = capture_block_inputs(shell, ids)  # (n, L, H)
        self.hidden = self.hidden0 = hidden[: self.ids.shape[0]]  # hidden0: a sequential sweep restarts from it
        del shell
        gc.collect()
        self.mem.mark("captured")
        return int(self.hidden.shape[0])

    def restart_hidden(self) -> None:
        """Back to the dense block-0 inputs (the next candidate of a sequential sweep)."""
        self.hidden = self.hidden0

    def _open_block(self, index: int, grad_kind: str | None, owners: int | dict[str, int]) -> tuple:
        """``(ZeRO-3 block, plain copy on this rank's device, local -> full weight names, local name ->
        gradient statistic gathered on its owner)`` of block ``index`` (collective); ``owners`` is one rank
        for every linear or local name -> rank."""
        from actors.zero3 import plain_block
        from orchestrator.engine.blocks import block_linears, decoder_blocks

        zblock = decoder_blocks(self.model)[index]
        block = plain_block(zblock, self.config, index)
        full = {n: f"{self.prefix}.{index}.{n}.weight" for n in block_linears(block)}
        dst = owners if isinstance(owners, dict) else dict.fromkeys(full, owners)
        grads = {n: self.grads.gather_to(f, grad_kind, dst[n]) for n, f in full.items()} if grad_kind else {}
        return zblock, block, full, grads

    def probe_block(self, index: int, forward_dtype: str, threshold: float) -> tuple[int, int]:
        """OWL's outlier count of dense block ``index`` over all ranks' inputs (collective); advances
        the hidden states with the dense outputs (:meth:`restart_hidden` goes back for the block pass)."""
        import torch.distributed as dist

        from orchestrator.engine.block_step import probe_step

        _, block, _, _ = self._open_block(index, None, 0)
        probe = probe_step(block, self.hidden, self.kwargs, Placement.of(self.device, forward_dtype), threshold,
                           reduce=dist.all_reduce)
        self.hidden = probe.hidden
        del block
        return probe.outliers, probe.total

    def prune_block(self, index: int, pcfg: Any, forward_dtype: str, grad_kind: str | None,
                    out_dir: str | None = None, write_back: bool = True, scorer: int | None = None) -> dict | None:
        """Prune block ``index`` with :func:`~orchestrator.engine.block_step.block_step` (collective).

        The statistics are all-reduced; each rank scores and prunes the linears it owns
        (:func:`~orchestrator.engine.block_step.linear_owners`; the gradient statistic ``grad_kind`` of a
        linear is gathered on its owner only) and broadcasts their weights and bit-packed masks, so every
        rank holds the pruned block and writes it back into its ZeRO-3 partitions (not for a sweep
        candidate: the partitions stay dense for the next one). Rank ``index % W`` then writes the block's
        tensors and masks under ``out_dir`` on a background thread (:class:`~actors.shard_writer.ShardWriter`).

        Args:
            scorer: one rank that scores every linear and returns masks and weights (a sweep's candidates
                on the driver); None: the ranks share the block and write it themselves.

        Returns:
            ``{"rows": this rank's report rows, "written": the record of this rank's previous block write,
            "order": full name -> position in the block}``;
            with ``scorer``: that rank's masks, weights and rows, None elsewhere.
        """
        import torch.distributed as dist

        from actors.zero3 import full_shape
        from actors.zero3 import write_back as write_back_block
        from orchestrator.engine.block_step import StepContext, block_step, linear_owners
        from orchestrator.engine.blocks import block_linears, decoder_blocks
        from orchestrator.engine.local import layer_row
        from orchestrator.outputs.shards import writer_rank

        zlinears = block_linears(decoder_blocks(self.model)[index])
        sizes = {n: math.prod(full_shape(m.weight)) for n, m in zlinears.items()}  # elements of each weight
        owners = dict.fromkeys(sizes, scorer) if scorer is not None else linear_owners(sizes, self.world)
        zblock, plain, full, grads = self._open_block(index, grad_kind, owners)
        masks: dict[str, torch.Tensor] = {}

        def share(linears: dict[str, torch.nn.Module]) -> None:
            for n, lin in linears.items():  # each owner's weights everywhere, bit for bit
                dist.broadcast(lin.weight.data, src=owners[n])

        ctx = StepContext(pcfg, Placement.of(self.device, forward_dtype), grads=grads.get, reduce=dist.all_reduce,
                          share=share, owns=lambda n: owners[n] == self.rank, positions=self.positions)
        step = block_step(plain, self.hidden, self.kwargs, ctx)
        self.hidden = step.hidden
        linears = block_linears(plain)
        if write_back:
            write_back_block(zblock, {n: lin.weight.data for n, lin in linears.items()}, self.rank)
        mine = step.results[0]
        self.scored += sum(r.mask.numel() for r in mine.values())
        if scorer is not None:
            return _answer(mine, linears, full) if self.rank == scorer else None
        masks = self._share_masks(linears, owners, mine, full)
        rows = [layer_row(full[n], r) for n, r in mine.items()]
        written = self.settle_writes()  # block i - 1's write overlapped this block; its record goes back now
        if out_dir is not None and writer_rank(index, self.world) == self.rank:
            tensors = {f"{self.prefix}.{index}.{n}": to_cpu(p.data).clone() for n, p in plain.named_parameters()}
            if self.shards is None:
                from actors.shard_writer import ShardWriter

                self.shards = ShardWriter()
            self.shards.submit(Path(out_dir), index, tensors, masks)
        del plain
        return {"rows": rows, "written": written, "order": {f: k for k, f in enumerate(full.values())}}

    def _share_masks(self, linears: dict, owners: dict[str, int], mine: dict, full: dict[str, str]) -> dict:
        """Every linear's mask (bool, full names, on the CPU) from its owner, broadcast bit-packed (collective)."""
        import torch.distributed as dist

        from orchestrator.outputs.shards import pack_bits, unpack_bits

        out = {}
        for n, lin in linears.items():
            shape = lin.weight.shape
            if n in mine:
                packed = pack_bits(mine[n].mask.to(self.device))
            else:
                packed = torch.empty((math.prod(shape) + 7) // 8, dtype=torch.uint8, device=self.device)
            dist.broadcast(packed, src=owners[n])
            out[full[n]] = unpack_bits(packed.cpu(), shape)  # (out, in) True = pruned
        return out

    def settle_writes(self) -> dict | None:
        """Wait for this rank's block write in flight; returns its record (None when there was none)."""
        return None if self.shards is None else self.shards.settle()

    def write_outside(self, out_dir: str) -> dict | None:
        """Write every parameter outside the decoder blocks (embeddings, final norm, an untied head) into
        ``model/model-outside.safetensors`` under ``out_dir`` (collective: one gathered tensor at a time;
        rank 0 writes). Returns rank 0's file record, None elsewhere."""
        import deepspeed

        from orchestrator.outputs.shards import MODEL_DIR, OUTSIDE_SHARD, write_tensors

        tensors = {}
        for name, p in self.model.named_parameters():
            if name.startswith(f"{self.prefix}."):
                continue
            with deepspeed.zero.GatheredParameters([p]):
                if self.rank == 0:
                    tensors[name] = to_cpu(p.data).clone()
        if self.rank != 0:
            return None
        rel = f"{MODEL_DIR}/{OUTSIDE_SHARD}"
        return {"files": {rel: write_tensors(Path(out_dir) / rel, tensors)}}

    def sweep_block(self, index: int, pcfgs: list[Any], forward_dtype: str, grad_kind: str | None,
                    scorer: int = 0) -> list[dict] | None:
        """Prune block ``index`` once per candidate config from one set of statistics (collective; a
        non-sequential sweep). The next inputs are the dense block's outputs and the ZeRO-3
        partitions stay dense; rank ``scorer`` returns one answer per candidate."""
        import torch.distributed as dist

        from orchestrator.engine.block_step import StepContext, block_step
        from orchestrator.engine.blocks import block_linears

        _, block, full, grads = self._open_block(index, grad_kind, scorer)
        ctx = StepContext(pcfgs[0], Placement.of(self.device, forward_dtype), grads=grads.get,
                          reduce=dist.all_reduce, owns=lambda _n: self.rank == scorer)
        targets = [(copy.deepcopy(block), c) for c in pcfgs] if self.rank == scorer else []
        step = block_step(block, self.hidden, self.kwargs, ctx, targets=targets or [(block, pcfgs[0])])
        self.hidden = step.hidden
        if self.rank != scorer:
            return None
        return [_answer(res, block_linears(t), full) for res, (t, _) in zip(step.results, targets, strict=True)]

    def replay_block(self, index: int, path: str, sha256: str, pcfg: Any, forward_dtype: str) -> None:
        """Restore a checkpointed block from its file (collective): the same weights in the ZeRO-3 partitions
        and the same next-block inputs as :meth:`prune_block` left behind (the one block step, replaying).
        Every rank reads the block's file (hash-checked) from the shared checkpoint directory."""
        from actors.checkpoint import load_tensors
        from actors.zero3 import write_back
        from orchestrator.engine.block_step import StepContext, block_step
        from orchestrator.engine.blocks import block_linears

        zblock, block, full, _ = self._open_block(index, None, 0)  # no gradients: nothing is scored
        saved = load_tensors(Path(path), sha256)
        local = {n: saved[f] for n, f in full.items()}
        ctx = StepContext(pcfg, Placement.of(self.device, forward_dtype))
        self.hidden = block_step(block, self.hidden, self.kwargs, ctx, replay=local).hidden
        write_back(zblock, {n: lin.weight.data for n, lin in block_linears(block).items()}, self.rank)
        del block

    def num_blocks(self) -> int:
        """Number of decoder blocks of the loaded model."""
        from orchestrator.engine.blocks import decoder_blocks

        return len(decoder_blocks(self.model))

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
        }

    def grad_partitions(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's raw statistic partitions, on the CPU (for tests)."""
        return {} if self.grads is None else to_cpu(self.grads.chunks)

    def finish(self) -> None:
        """Drop the model, engine and shards of the current run."""
        self._drop_engine()
        self._reset()
