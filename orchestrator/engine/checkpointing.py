"""Activation checkpointing of the gradient pass, one decoder block at a time (torch only).

Without it a gradient pass keeps every block's activations until the backward reaches that block:
about ``L * (8 H + 4 I)`` values per block and sequence (58 GiB for one 2048-token sequence of
Llama-2-70B in bf16). With it, only each block's input ``(B, T, H)`` is kept; a block's
activations are recomputed when the backward reaches it and freed when it leaves.

The reentrant form of :func:`torch.utils.checkpoint.checkpoint` is used on purpose: its first
forward runs with autograd off, so the per-sample statistic hooks
(:class:`actors.zero3.ShardedGradStats`, which keep a linear's input until its output gradient
arrives) see only the recomputed forward inside the backward, and keep one block's inputs at a
time. Each block's recompute and backward are the same operations as without checkpointing, so
the statistics are the same.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from orchestrator.engine.blocks import decoder_blocks


@dataclass
class Recomputes:
    """How many block forwards the backward recomputed inside a :func:`checkpointed_blocks` context."""

    count: int = 0


def _checkpointed(forward, recomputes: Recomputes):
    """``forward`` of one block, recomputed in the backward when autograd is on."""

    def counted(*args, **kwargs):
        recomputes.count += torch.is_grad_enabled()  # the first run is under no_grad; the recompute is not
        return forward(*args, **kwargs)

    @functools.wraps(forward)
    def run(hidden: torch.Tensor, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(hidden, *args, **kwargs)
        if not hidden.requires_grad:  # block 0 under frozen embeddings: the backward must still enter
            hidden = hidden.detach().requires_grad_()
        return checkpoint(functools.partial(counted, **kwargs), hidden, *args, use_reentrant=True)

    return run


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[Recomputes]:
    """Within the context, every decoder block of ``model`` recomputes its activations in the backward.

    Args:
        model: a causal LM (or its decoder) whose blocks :func:`~orchestrator.engine.blocks.decoder_blocks`
            finds; under ZeRO-3 the partitioned model itself (its modules' hooks stay as they are).
        enabled: False: a no-op context (the plain pass).

    Yields:
        The count of recomputed block forwards (0 when not ``enabled``).
    """
    recomputes = Recomputes()
    if not enabled:
        yield recomputes
        return
    blocks = list(decoder_blocks(model))
    for block in blocks:
        # an instance attribute: the class's forward is untouched
        block.forward = _checkpointed(block.forward, recomputes)
    try:
        yield recomputes
    finally:
        for block in blocks:
            del block.forward
