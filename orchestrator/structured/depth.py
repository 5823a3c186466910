"""Depth pruning: remove whole decoder blocks that change their input least.

Block influence (ShortGPT's BI): ``BI_i = 1 - mean over tokens of cos(h_i, h_{i+1})``, with ``h_i`` the
hidden state entering block ``i`` on the calibration sequences. A block whose output points where its
input did contributes little; the ``k`` blocks of lowest influence are removed, and the model stays a
plain checkpoint of its architecture with ``num_hidden_layers - k`` blocks. Torch only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from orchestrator.engine.blocks import block_prefix, capture_block_inputs, decoder_blocks, forward_all
from orchestrator.structured.portable import SIZES_KEY

log = logging.getLogger(__name__)


@torch.no_grad()
def block_influence(model: nn.Module, calib_ids: torch.Tensor) -> torch.Tensor:
    """``(n_blocks,)`` fp64 block influence of every block on the calibration sequences.

    Args:
        model: a causal LM.
        calib_ids: ``(N, L)`` calibration sequences.
    """
    device = next(model.parameters()).device
    hidden, kwargs = capture_block_inputs(model, calib_ids.to(device))  # (N, L, d)
    out = []
    for block in decoder_blocks(model):
        nxt = forward_all(block, hidden, kwargs)  # (N, L, d)
        cos = torch.nn.functional.cosine_similarity(hidden.double(), nxt.double(), dim=-1)  # (N, L)
        out.append(1.0 - float(cos.mean()))
        hidden = nxt
    return torch.tensor(out, dtype=torch.float64)


def least_influential(influence: torch.Tensor, count: int) -> list[int]:
    """The ``count`` blocks of lowest influence, in block order.

    Raises:
        ValueError: ``count`` leaves no block.
    """
    if not 0 <= count < influence.numel():
        raise ValueError(f"structured.depth_blocks: {count} of {influence.numel()} blocks would leave none")
    return sorted(int(i) for i in torch.argsort(influence)[:count])


def remove_blocks(model: nn.Module, drop: list[int]) -> None:
    """Remove the given decoder blocks in place and keep the config and the cache indices in step.

    Args:
        model: a causal LM.
        drop: block indices to remove.
    """
    blocks = decoder_blocks(model)
    keep = [i for i in range(len(blocks)) if i not in set(drop)]
    parent_name, attr = block_prefix(model).rsplit(".", 1)
    setattr(model.get_submodule(parent_name), attr, nn.ModuleList([blocks[i] for i in keep]))
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    for new, block in enumerate(decoder_blocks(model)):
        for mod in block.modules():  # the KV cache is indexed by these
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    for key in ("layer_types", SIZES_KEY):  # per-block lists follow the kept blocks
        values = getattr(cfg, key, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(cfg, key, [values[i] for i in keep])
    log.info("structured: removed blocks %s (%d left)", drop, len(keep))

