"""Block-level reconstruction (``pruning.reconstruct: block``, METHODS.md section 2, "after the mask").

With every linear of a decoder block pruned (and its kept weights re-solved layer by layer), the
kept weights of the whole block are tuned together so the pruned block reproduces the dense
block's outputs on the calibration inputs::

    min_{W_K}  sum_seq || block(x; W) - block_dense(x) ||^2      pruned weights held at zero

Layer-wise least squares matches each linear's output to its dense output on its own (pruned)
inputs; the block objective also corrects what the errors of earlier linears do to later ones
(attention, the MLP's gate), which no per-layer solve sees.

Adam with minibatches of sequences: step ``s`` of an epoch of ``k`` steps takes the sequences
whose *global* calibration index ``g`` has ``g % k == s``, so a rank's share of a step depends only
on which sequences it holds, and the SUM all-reduce of the gradients makes every rank take the
step one process would take over all sequences. Gradients are masked, so pruned weights stay zero.

Torch only (no Ray, no DeepSpeed): the caller passes the SUM all-reduce.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.engine.blocks import block_output
from orchestrator.engine.device import Placement

log = logging.getLogger(__name__)

#: in-place SUM of a tensor over all ranks (identity in one process)
Reduce = Callable[[torch.Tensor], None]


@dataclass
class TuneOutcome:
    """What block tuning did.

    Attributes:
        steps: optimiser steps taken.
        loss_first: mean squared output error of the first step (before any update).
        loss_last: mean squared output error of the last step's minibatch (before its update).
    """

    steps: int
    loss_first: float
    loss_last: float


def epoch_steps(total: int, batch: int) -> int:
    """Minibatches per epoch: ``ceil(total / batch)`` (at least one)."""
    return max(1, math.ceil(total / max(batch, 1)))


def tune_block(block: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
               hidden: torch.Tensor, target: torch.Tensor, kwargs: dict, place: Placement,
               epochs: int, batch: int, lr: float, positions: list[int] | None = None,
               reduce: Reduce | None = None) -> TuneOutcome:
    """Tune the kept weights of ``linears`` (in place) so ``block`` reproduces ``target``.

    Args:
        block: the pruned block (its linears' weights are updated; nothing else is).
        linears: local name -> linear layer of ``block`` whose kept weights are tuned.
        masks: local name -> ``(out, in)`` bool, True = pruned (held at zero).
        hidden: ``(n, L, H)`` this process's block inputs.
        target: ``(n, L, H)`` the dense block's outputs on ``hidden``.
        kwargs: the block's keyword arguments (for one sequence).
        place: device and autocast dtype of the forwards and backwards (the weights stay as they are).
        epochs: passes over the calibration sequences.
        batch: sequences per optimiser step (over all ranks).
        lr: Adam's learning rate.
        positions: global calibration index of each local sequence (default ``range(n)``).
        reduce: in-place SUM over all ranks (None in one process).

    Returns:
        Step count and the first and last minibatch losses (mean squared error per element).
    """
    n = hidden.shape[0]
    positions = list(range(n)) if positions is None else positions
    total = torch.tensor([n], dtype=torch.int64, device=hidden.device)
    if reduce is not None:
        reduce(total)
    k = epoch_steps(int(total), batch)
    params = [lin.weight for lin in linears.values()]
    keeps = [(~masks[name]).to(lin.weight.dtype) for name, lin in linears.items()]  # (out, in) 1 = kept
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    try:
        for _epoch in range(epochs):
            for s in range(k):
                losses.append(_step(block, params, keeps, hidden, target, kwargs, place, opt,
                                    [j for j, g in enumerate(positions) if g % k == s], reduce))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    log.debug("block tuning: %d steps, loss %.4g -> %.4g", len(losses), losses[0], losses[-1])
    return TuneOutcome(len(losses), losses[0], losses[-1])


def _step(block: nn.Module, params: list[nn.Parameter], keeps: list[torch.Tensor], hidden: torch.Tensor,
          target: torch.Tensor, kwargs: dict, place: Placement, opt: torch.optim.Optimizer, rows: list[int],
          reduce: Reduce | None) -> float:
    """One Adam step on this rank's ``rows`` of the global minibatch; returns the minibatch's mean loss."""
    for p in params:
        p.grad = torch.zeros_like(p)
    sse = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for j in rows:  # one sequence per forward: the block's kwargs are for one sequence
        out = block_output(block, hidden[j:j + 1], kwargs, place).float()  # (1, L, H)
        loss = (out - target[j:j + 1].float()).pow(2).sum()
        loss.backward()
        sse += loss.detach()
    count = torch.tensor(float(len(rows) * hidden.shape[1] * hidden.shape[2]), device=hidden.device)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [sse.reshape(1), count.reshape(1)])
    if reduce is not None:
        reduce(flat)  # one all-reduce: every rank's gradients, losses and element counts
    elems = float(flat[-1])
    if elems == 0:
        return float("nan")
    offset = 0
    for p, keep in zip(params, keeps, strict=True):
        size = p.numel()
        p.grad = (flat[offset:offset + size].view_as(p) / elems).to(p.dtype) * keep
        offset += size
    opt.step()
    with torch.no_grad():
        for p, keep in zip(params, keeps, strict=True):
            p.mul_(keep)  # pruned weights stay exactly zero
    return float(flat[-2]) / elems
