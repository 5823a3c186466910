"""DeepSpeed ZeRO-3 plumbing used inside a worker actor.

* build a DeepSpeed engine whose backward never steps (``SGD(lr=0)``),
* fold per-sequence gradient statistics into partitions laid out like ZeRO-3's
  ``ds_tensor`` (flatten, pad to a multiple of the world size, chunk ``rank``),
* gather one block into a plain (non-ZeRO) module and write pruned weights back.

Everything here is collective: every rank must call the same functions in the same order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from actors.host_fold import HostFolder
from orchestrator.planner import FOLD_PENDING

log = logging.getLogger(__name__)

# torch >= 2.13 renamed the tensor-in/tensor-out collectives
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def partition_bytes(model: nn.Module) -> int:
    """Bytes of the parameter partitions (``ds_tensor``) this rank holds."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        total += t.numel() * t.element_size()
    return total


def full_shape(p: nn.Parameter) -> torch.Size:
    """The full shape of a (possibly partitioned) parameter."""
    return getattr(p, "ds_shape", None) or p.shape


def make_engine(model: nn.Module, config: dict[str, Any], trainable: set[str]):
    """Wrap ``model`` in a ZeRO-3 engine; only ``trainable`` parameters get gradients.

    The optimizer is an ``SGD(lr=0)`` that is never stepped: ``engine.backward`` refuses
    to run without one (and a direct ``loss.backward()`` is refused under ZeRO-3), so at
    least one small parameter must be trainable.
    """
    import deepspeed

    if not trainable:
        raise ValueError("make_engine needs at least one trainable parameter")
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    params = [p for n, p in model.named_parameters() if n in trainable]
    opt = torch.optim.SGD(params, lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


class Decoder(nn.Module):
    """A causal LM without its head: ``ids (B, T)`` -> final hidden states ``(B, T, H)``.

    The gradient pass wraps this (not the whole LM) in the ZeRO-3 engine and computes the loss
    from the hidden states in chunks (:func:`orchestrator.pruning.lmloss.lm_loss_with_grad`), so
    no ``(B, T, V)`` logits are ever built. The modules are the LM's own (same hooks, same
    partitions).
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.decoder = lm.base_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.decoder(input_ids=ids, use_cache=False).last_hidden_state


def head_loss(lm: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of per-sequence mean next-token losses from the final hidden states (collective gather of the head)."""
    import deepspeed

    from orchestrator.pruning.lmloss import lm_loss_with_grad

    head = lm.get_output_embeddings()
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    with deepspeed.zero.GatheredParameters(params):
        return lm_loss_with_grad(hidden, head.weight, ids, getattr(head, "bias", None))


class ShardedGradStats:
    """Per-sequence gradient sums of a set of linear weights, each rank holding a ``1/world`` partition.

    No weight needs ``requires_grad``: a forward hook on each linear keeps its input and hooks
    the output's gradient; there the per-sample weight gradients of the local micro-batch are
    formed (:func:`~orchestrator.pruning.stats.per_sample_weight_grad_stats`), folded into
    statistics and reduce-scattered (SUM), so rank ``r`` adds chunk ``r`` of the flattened,
    padded statistic to its buffer. ZeRO's own gradient buckets, partitions and averaging are
    never involved, and one gather of the parameters serves a whole micro-batch. The
    reduce-scatters are asynchronous (at most ``max_pending`` in flight, each holding one padded
    full-size statistic of one layer), so they overlap the backward of the layers below;
    :meth:`flush` settles them after every backward.
    """

    def __init__(self, modules: dict[str, nn.Linear], kinds: tuple[str, ...], scale: float,
                 device: torch.device | str = "cpu", max_pending: int = FOLD_PENDING,
                 compute_dtype: torch.dtype = torch.float32, offload: bool = False,
                 probe: Callable[[], None] | None = None) -> None:
        self.kinds = kinds
        self.device = torch.device(device)
        # where the partitions live: the rank's device, or (offload) host memory, pinned when the device is a GPU
        self.home = torch.device("cpu") if offload else self.device
        pin = offload and self.device.type == "cuda"
        self.compute_dtype = compute_dtype  # of the per-sample products (the pass's autocast dtype)
        self.probe = probe  # called while the per-sample products are live (a memory peak sampler)
        self.scale = scale
        self.weights = torch.ones(1, device=device)  # (B,) per-sample weights of the current micro-batch
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.shapes = {n: full_shape(m.weight) for n, m in modules.items()}
        self.chunks: dict[str, dict[str, torch.Tensor]] = {}
        self.totals: dict[str, dict[str, torch.Tensor]] | None = None  # mini-batch mode: see end_minibatch
        self.seconds = {"statistics": 0.0, "reduce_scatter": 0.0}  # time spent in the gradient hooks
        # reduce-scatters run asynchronously, overlapping the backward of earlier layers; at most
        # ``max_pending`` padded full-size statistics wait for their collective at any time
        self.pending: list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (work, out, buf, input)
        self.max_pending = max_pending
        self.host = HostFolder()  # offloaded partitions: pinned, non-blocking copies from the device
        for n, shape in self.shapes.items():
            c = math.ceil(math.prod(shape) / self.world)
            # (ceil(numel/W),) fp32 at home; NCCL reduce-scatters into a device tensor, which is then added here
            self.chunks[n] = {k: torch.zeros(c, dtype=torch.float32, device=self.home, pin_memory=pin) for k in kinds}
        self.handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in modules.items()]

    def set_batch(self, weights: torch.Tensor) -> None:
        """Per-sample weights ``(B,)`` of the next micro-batch (1 = real sequence, 0 = padding)."""
        self.weights = weights.float() * self.scale

    def _forward_hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                x = inputs[0].detach()  # (B, T, in)
                output.register_hook(lambda grad: self._fold(name, x, grad))

        return hook

    def _fold(self, name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        from orchestrator.pruning.stats import per_sample_weight_grad_stats

        t0 = time.perf_counter()
        stats = per_sample_weight_grad_stats(x, grad_out, self.kinds, self.weights, self.compute_dtype)
        t1 = time.perf_counter()
        self.seconds["statistics"] += t1 - t0
        for kind, stat in stats.items():
            buf = self.chunks[name][kind]
            flat = stat.reshape(-1)
            pad = buf.numel() * self.world - flat.numel()
            full = torch.nn.functional.pad(flat, (0, pad)) if pad else flat  # (W * chunk,)
            if self.world == 1:
                self.host.add(buf, full)
                continue
            out = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
            work = _reduce_scatter(out, full, op=dist.ReduceOp.SUM, async_op=True)
            self.pending.append((work, out, buf, full))
            while len(self.pending) > self.max_pending:
                self._settle_oldest()
        if self.probe is not None:  # the statistics and the reduce-scatters in flight are live now
            self.probe()
        self.seconds["reduce_scatter"] += time.perf_counter() - t1

    def _settle_oldest(self) -> None:
        work, out, buf, _full = self.pending.pop(0)
        work.wait()
        self.host.add(buf, out)

    def flush(self) -> None:
        """Wait for the reduce-scatters still in flight and fold them into the partitions."""
        t0 = time.perf_counter()
        while self.pending:
            self._settle_oldest()
        self.host.flush()
        self.seconds["reduce_scatter"] += time.perf_counter() - t0

    def end_minibatch(self) -> None:
        """Add the partitions to :attr:`totals` (the statistics of all finished mini-batches) and zero them."""
        if self.totals is None:
            self.totals = {n: {k: t.clone() for k, t in d.items()} for n, d in self.chunks.items()}
        else:
            for n, d in self.chunks.items():
                for k, t in d.items():
                    self.totals[n][k].add_(t)
        for d in self.chunks.values():
            for t in d.values():
                t.zero_()

    def remove(self) -> None:
        """Remove the gradient hooks (the partitions stay)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def nbytes(self) -> int:
        """Bytes of the partitions this rank holds (with the mini-batch totals, when kept)."""
        held = [self.chunks] + ([self.totals] if self.totals is not None else [])
        return sum(t.numel() * t.element_size() for c in held for d in c.values() for t in d.values())

    def gather_to(self, name: str, kind: str, dst: int = 0) -> torch.Tensor | None:
        """Gather one statistic into its full fp32 tensor on rank ``dst`` only (collective); None elsewhere."""
        chunk = self.chunks[name][kind].to(self.device, non_blocking=True)  # collectives work on device tensors
        parts = [torch.empty_like(chunk) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(chunk, parts, dst=dst)
        if self.rank != dst:
            return None
        numel = math.prod(self.shapes[name])
        return torch.cat(parts)[:numel].reshape(self.shapes[name])


def plain_block(block: nn.Module, config: Any, index: int) -> nn.Module:
    """A plain, non-partitioned copy of a ZeRO-3 decoder block (collective gather).

    The block class is instantiated on the meta device and the gathered parameters
    assigned into it, so no random initialisation is paid for.
    """
    import deepspeed

    params = list(block.parameters())
    with deepspeed.zero.GatheredParameters(params):
        state = {n: p.data.detach().clone() for n, p in block.named_parameters()}
    try:
        with torch.device("meta"):
            copy = type(block)(config, index)
        missing = [n for n, _ in copy.named_buffers()]
        if missing:
            raise TypeError("block has buffers")
        copy.load_state_dict(state, assign=True)
    except TypeError:  # a block with buffers: build it for real on the parameters' device
        device = next(iter(state.values())).device
        with torch.device(device):
            copy = type(block)(config, index)
        copy.load_state_dict(state, strict=False)
    return copy.eval()


def write_back(block: nn.Module, weights: dict[str, torch.Tensor], rank: int) -> None:
    """Write pruned weights (local name -> ``(out, in)``) into the ZeRO-3 partitions (collective)."""
    import deepspeed

    mods = dict(block.named_modules())
    params = [mods[n].weight for n in weights]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        if rank == 0:
            for p, w in zip(params, weights.values(), strict=True):
                p.data.copy_(w.to(p.dtype))


def gather_outside_blocks_into(zero_model: nn.Module, shell: nn.Module, blocks: str) -> None:
    """Copy every (gathered) parameter of the ZeRO-3 model that the plain ``shell`` has outside its decoder
    blocks (under the dotted prefix ``blocks``): the embeddings and whatever else runs before block 0, e.g.
    learned positions (collective: every rank gathers the same parameters in the same order)."""
    import deepspeed

    src = dict(zero_model.named_parameters())
    for name, dst in shell.named_parameters():
        if name.startswith(f"{blocks}.") or name not in src:
            continue
        with deepspeed.zero.GatheredParameters([src[name]]), torch.no_grad():
            dst.data.copy_(src[name].data)


@dataclass(frozen=True)
class ScoredTensor:
    """One grouped weight tensor as the ranks score it.

    Attributes:
        module: key of the module whose groups these are (``"3.mlp"``).
        name: full parameter name.
        shape: ``(rows, cols)`` of the whole weight.
        dim: group axis.
        width: entries per group along ``dim``.
        offset: start of the module's segment along ``dim``.
        groups: ``G``, the module's groups.
    """

    module: str
    name: str
    shape: tuple[int, int]
    dim: int
    width: int
    offset: int
    groups: int


def rank_group_sums(params: dict[str, torch.nn.Parameter], stats: dict[str, dict[str, torch.Tensor]],
                    table: list[ScoredTensor], estimators: list[str], device: torch.device) -> list[torch.Tensor]:
    """Group scores of every tensor of ``table`` for each estimator, added over the ranks (collective).

    Args:
        params: the ZeRO-3 parameters by full name (their ``ds_tensor`` is this rank's partition).
        stats: name -> kind -> this rank's statistic partition (``sum``, maybe ``sq``).
        table: what to score, the same on every rank.
        estimators: SAAP's estimators.
        device: the rank's device (the all-reduce's tensor lives there).

    Returns:
        Per estimator (in order), the concatenation of every tensor's ``(G,)`` scores (fp32, on the CPU).
    """
    from orchestrator.structured.importance import finish_group_scores, partition_group_sums

    rank = dist.get_rank()
    parts = []
    for est in estimators:
        for t in table:
            part = params[t.name].ds_tensor  # (ceil(numel / W),)
            by_kind = stats[t.name]
            sq = by_kind.get("sq")
            parts.append(partition_group_sums(
                part.to(device), by_kind["sum"].to(device), None if sq is None else sq.to(device), est,
                rank * part.numel(), t.shape, t.dim, t.width, t.offset, t.groups))
    flat = torch.cat(parts)  # float64, one collective for everything
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, i = [], 0
    per_est = sum(t.groups for t in table)
    for est in estimators:
        out.append(finish_group_scores(flat[i : i + per_est], est).cpu())
        i += per_est
    return out
