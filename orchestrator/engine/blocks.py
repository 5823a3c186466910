"""Model-structure helpers for block-sequential work: find blocks and linears, capture
block inputs, run one block, collect per-linear input statistics.

Torch and transformers only (no Ray, no DeepSpeed), shared by the local and the
distributed engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from orchestrator.engine.device import Placement
from orchestrator.errors import UsageError
from orchestrator.pruning.stats import ActivationStats

CPU = Placement()


class _StopForward(Exception):
    """Raised by the capture hook to end the forward after block 0's inputs are known."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks (``model.model.layers`` for the LLaMA family).

    Raises:
        UsageError: no ModuleList of ``num_hidden_layers`` blocks found.
    """
    n = getattr(model.config, "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return mod
    raise UsageError(f"model: cannot find its {n} decoder blocks (architecture {type(model).__name__})")


def block_prefix(model: nn.Module) -> str:
    """Dotted name of the block list (e.g. ``model.layers``)."""
    blocks = decoder_blocks(model)
    for name, mod in model.named_modules():
        if mod is blocks:
            return name
    raise AssertionError("unreachable")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by their name inside the block, in module order."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every sequence, and the block's keyword arguments.

    Args:
        model: a causal LM.
        input_ids: ``(N, L)`` int64 sequences of equal length, on the model's device.

    Returns:
        ``(hidden, kwargs)``: ``(N, L, hidden)`` in the model's dtype, and the keyword
        arguments block 0 received (rotary embeddings, mask, positions), which are the
        same for every sequence of length L.
    """
    blocks = decoder_blocks(model)
    captured: dict = {}

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    rows = []
    try:
        for i in range(input_ids.shape[0]):
            with contextlib.suppress(_StopForward):
                model(input_ids[i : i + 1], use_cache=False)
            rows.append(captured["hidden"][0])
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    for key in ("past_key_values", "past_key_value", "use_cache"):
        kwargs.pop(key, None)
    return torch.stack(rows), kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, place: Placement = CPU) -> torch.Tensor:
    """One block forward on ``(B, L, hidden)`` under the placement's autocast; returns the output hidden states."""
    with torch.no_grad():
        return block_output(block, hidden, kwargs, place)


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict, place: Placement = CPU) -> torch.Tensor:
    """:func:`run_block` with autograd on (for tuning the block's weights): ``(B, L, hidden)`` out."""
    with place.autocast():
        out = _first_tensor(block(hidden, **kwargs))
    return out.to(hidden.dtype)


@contextlib.contextmanager
def collect_inputs(linears: dict[str, nn.Linear], with_xtx: bool) -> Iterator[dict[str, ActivationStats]]:
    """Hook every linear of ``linears`` and fold its inputs into :class:`ActivationStats`."""
    stats = {name: ActivationStats(lin.in_features, with_xtx=with_xtx, device=lin.weight.device)
             for name, lin in linears.items()}
    handles = []
    for name, lin in linears.items():
        def hook(_mod, args, _out, _name=name):
            stats[_name].update(args[0].detach())

        handles.append(lin.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def forward_all(block: nn.Module, hidden: torch.Tensor, kwargs: dict, place: Placement = CPU, batch: int = 1
                ) -> torch.Tensor:
    """Run ``block`` over all ``(N, L, hidden)`` sequences, ``batch`` at a time; ``(N, L, hidden)`` out."""
    if hidden.shape[0] == 0:  # a rank with no local sequences (fewer sequences than workers)
        return hidden
    outs = [run_block(block, hidden[i : i + batch], kwargs, place) for i in range(0, hidden.shape[0], batch)]
    return torch.cat(outs, dim=0)
