"""Row variants of the structured benchmark: how one row's model is pruned from the dense one.

A variant is a ``+``-joined list of tokens:

- ``uniform``, ``adaptive``, ``adaptive:INDICATOR``, ``global``: the allocation (default ``adaptive``);
- ``mlp``: MLP channels only (attention kept whole);
- ``comp``: weight compensation (``structured.compensate``);
- ``obs``: compensation with the groups chosen by reconstruction (``structured.selection: reconstruction``);
- ``depth``: depth pruning alone, ``round(target * blocks)`` blocks of lowest influence (no groups);
- ``depthN``: ``N`` blocks removed first, the rest of the target from groups.

e.g. ``adaptive`` (SAAP as published), ``global+comp``, ``mlp+global+comp``, ``depth``, ``depth3+global+comp``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from orchestrator.inputs.config import StructuredConfig
from orchestrator.structured.groups import decoder_params
from orchestrator.structured.run import Importance, apply_pruning, prune_depth
from orchestrator.structured.shrink import sync_config


def variant_config(base: StructuredConfig, target: float, variant: str, depth: int) -> StructuredConfig:
    """The structured options of one variant at ``target`` (``depth``: the model's block count)."""
    s = copy.deepcopy(base)
    s.target, s.allocation = target, "adaptive"
    for token in variant.split("+"):
        if token in ("uniform", "adaptive", "global"):
            s.allocation = token
        elif token.startswith("adaptive:"):
            s.allocation, s.indicator = "adaptive", token.split(":", 1)[1]
        elif token == "mlp":
            s.modules = "mlp"
        elif token == "comp":
            s.compensate = True
        elif token == "obs":
            s.compensate, s.selection = True, "reconstruction"
        elif token == "depth":
            s.depth_blocks = round(target * depth)
        elif token.startswith("depth"):
            s.depth_blocks = int(token[len("depth"):])
        else:
            raise SystemExit(f"--rows: unknown variant token {token!r} in {variant!r}")
    return s


def prune_variant(dense: torch.nn.Module, calib: torch.Tensor, base: StructuredConfig, target: float, variant: str,
                  importance: Callable[[torch.nn.Module], Importance]) -> tuple[torch.nn.Module, dict]:
    """A pruned copy of ``dense`` and its report fields (``removed_fraction``, ``layer_sizes``, ``depth``).

    Args:
        dense: the dense model (not changed).
        calib: ``(N, L)`` calibration windows.
        base: the run's structured options.
        target: fraction of decoder parameters removed.
        variant: see the module docstring.
        importance: the importance of a model (cached by the caller: the dense model's is computed once).
    """
    s = variant_config(base, target, variant, dense.config.num_hidden_layers)
    model = copy.deepcopy(dense)
    dense_params = decoder_params(dense)
    depth = prune_depth(model, calib, s.depth_blocks) if s.depth_blocks else None
    only_depth = "depth" in variant.split("+")
    if only_depth:
        rep = {"layer_sizes": sync_config(model)}
    else:
        rep = apply_pruning(model, importance(model), s, calib, dense_params)
    return model, {"removed_fraction": 1 - decoder_params(model) / dense_params, "layer_sizes": rep["layer_sizes"],
                   "depth": depth, "options": {k: getattr(s, k) for k in ("allocation", "indicator", "modules",
                                                                          "compensate", "selection", "depth_blocks")},
                   "compensation": rep.get("compensation", [])}
