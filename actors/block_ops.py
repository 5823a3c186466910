"""The block-sequential pass of a :class:`~actors.worker.PruneWorker`: capture, probe, prune, replay, write.

A mixin of the worker (it uses the worker's model, hidden states, statistics, rank and device). Every call
that touches the model is collective. Each rank scores the linears it owns in every block
(:func:`~orchestrator.engine.block_step.linear_owners`), the owners broadcast weights and bit-packed masks,
and the block's writer rank writes the block's files on a background thread
(:class:`~actors.shard_writer.ShardWriter`): no tensor goes back to the driver.
"""

from __future__ import annotations

import copy
import gc
import math
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.device import Placement, to_cpu


class BlockPassOps:
    """The block pass's calls of a pruning worker (see the module docstring)."""

    def capture(self) -> int:
        """Block-0 inputs of this rank's sequences (local: a plain embedding shell, no ZeRO forwards)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from actors.loading import plain_construction
        from actors.zero3 import gather_outside_blocks_into
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
                    out_dir: str | None = None, write_back: bool = True) -> dict:
        """Prune block ``index`` with :func:`~orchestrator.engine.block_step.block_step` (collective).

        The statistics are all-reduced; each rank scores and prunes the linears it owns
        (:func:`~orchestrator.engine.block_step.linear_owners`; the gradient statistic ``grad_kind`` of a
        linear is gathered on its owner only) and broadcasts their weights and bit-packed masks, so every
        rank holds the pruned block and writes it back into its ZeRO-3 partitions (not for a sweep
        candidate of a sequential sweep: the partitions stay dense for the next one). Rank ``index % W`` then
        writes the block's tensors and masks under ``out_dir`` on a background thread
        (:class:`~actors.shard_writer.ShardWriter`).

        Returns:
            ``{"rows": this rank's report rows, "written": the record of this rank's previous block write,
            "order": full name -> position in the block}``.
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
        owners = linear_owners(sizes, self.world)
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
        self.devices["masks"].update(str(r.mask.device) for r in mine.values())
        masks = self._share_masks(linears, owners, mine, full)
        rows = [layer_row(full[n], r) for n, r in mine.items()]
        written = self.settle_writes()  # block i - 1's write overlapped this block; its record goes back now
        if out_dir is not None and writer_rank(index, self.world) == self.rank:
            # the plain copy is not touched again: its CPU tensors are written as they are (no second copy)
            tensors = {f"{self.prefix}.{index}.{n}": to_cpu(p.data) for n, p in plain.named_parameters()}
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
        return {"root": str(out_dir), "files": {rel: write_tensors(Path(out_dir) / rel, tensors)}}

    def sweep_block(self, index: int, pcfgs: list[Any], forward_dtype: str, grad_kind: str | None,
                    out_dirs: list[str], scorer: int = 0) -> dict | None:
        """Prune block ``index`` once per candidate config from one set of statistics (collective; a
        non-sequential sweep). The next inputs are the dense block's outputs and the ZeRO-3 partitions stay
        dense; rank ``scorer`` prunes every candidate and writes candidate ``k``'s block files under
        ``out_dirs[k]`` (one write in flight at a time, behind its work).

        Returns:
            On rank ``scorer``: ``{"rows": report rows per candidate, "written": records of the writes that
            finished meanwhile}``; None elsewhere.
        """
        import torch.distributed as dist

        from actors.shard_writer import ShardWriter
        from orchestrator.engine.block_step import StepContext, block_step
        from orchestrator.engine.local import layer_row

        _, block, full, grads = self._open_block(index, grad_kind, scorer)
        ctx = StepContext(pcfgs[0], Placement.of(self.device, forward_dtype), grads=grads.get,
                          reduce=dist.all_reduce, owns=lambda _n: self.rank == scorer)
        targets = [(copy.deepcopy(block), c) for c in pcfgs] if self.rank == scorer else []
        step = block_step(block, self.hidden, self.kwargs, ctx, targets=targets or [(block, pcfgs[0])])
        self.hidden = step.hidden
        if self.rank != scorer:
            return None
        if self.shards is None:
            self.shards = ShardWriter()
        rows, written = [], []
        for root, res, (t, _) in zip(out_dirs, step.results, targets, strict=True):
            rows.append([layer_row(full[n], r) for n, r in res.items()])
            tensors = {f"{self.prefix}.{index}.{n}": to_cpu(p.data) for n, p in t.named_parameters()}
            done = self.shards.submit(Path(root), index, tensors, to_cpu({full[n]: r.mask for n, r in res.items()}))
            if done is not None:
                written.append(done)
        return {"rows": rows, "written": written}

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
