"""Torch-Pruning peer rows of the structured benchmark (LLM-Pruner-style structured pruning, Taylor importance).

The peer prunes a copy of the dense model with ``torch_pruning`` (the ``peer`` extra):
first-order Taylor importance ``|w * dL/dw|`` from the calibration windows' loss gradients,
grouped by Torch-Pruning's dependency graph, the same ratio in every unprotected block
(LLM-Pruner's block-wise setting), the same protected first and last blocks as SAAP, kept
widths rounded like SAAP's, and the ratio searched so the peer removes the same number of
decoder parameters as the SAAP row it is compared with.

Only MLP channel groups are pruned. Torch-Pruning 1.6 never finishes building the
attention-head groups of a grouped-query-attention LLaMA (SmolLM2: 9 query / 3 key-value
heads): a 3-block GQA model spent over 60 s in ``_fix_dependency_graph_non_recursive``
without returning (upstream VainF/Torch-Pruning#527, open), while its MLP groups build in
0.06 s. The peer therefore takes its whole parameter budget from MLP channels.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from orchestrator.structured.groups import decoder_params

log = logging.getLogger("structured-bench.peer")


def available() -> str | None:
    """None when Torch-Pruning is importable, else why the peer rows are skipped."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return "torch-pruning is not installed (make peer-structured)"
    return None


def taylor_gradients(dense: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """The calibration loss gradient of every parameter (summed over windows, one window at a time).

    Args:
        dense: the dense causal LM (not modified: a copy is differentiated).
        calib: ``(N, L)`` calibration windows.

    Returns:
        Parameter name -> its gradient (one pass serves every target of a run).
    """
    model = copy.deepcopy(dense)
    model.zero_grad(set_to_none=True)
    for i in range(calib.shape[0]):
        ids = calib[i : i + 1]
        model(ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def prune_mlp_channels(model: nn.Module, ratio: float, protected: set[int], round_to: int) -> nn.Module:
    """Remove ``ratio`` of the MLP channels of every unprotected block by Taylor importance (in place).

    Args:
        model: a LLaMA-architecture causal LM whose ``.grad`` holds the calibration loss gradients.
        ratio: fraction of each unprotected block's MLP channels removed.
        protected: indices of blocks left whole.
        round_to: kept widths are rounded to a multiple of this.

    Returns:
        ``model``, shrunk.
    """
    import torch_pruning as tp

    ignored: list[nn.Module] = [model.get_output_embeddings()]
    for i, block in enumerate(model.model.layers):
        a = block.self_attn
        ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, block.mlp.down_proj]  # no head or hidden-size groups
        if i in protected:
            ignored += [block.mlp.gate_proj, block.mlp.up_proj]
    example = torch.zeros(1, 8, dtype=torch.long, device=next(model.parameters()).device)
    pruner = tp.pruner.BasePruner(model, example_inputs=example, importance=tp.importance.TaylorImportance(),
                                  global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
                                  round_to=round_to, output_transform=lambda out: out.logits)
    for group in pruner.step(interactive=True):
        group.prune()
    model.config.intermediate_size = max(b.mlp.gate_proj.out_features for b in model.model.layers)
    model.zero_grad(set_to_none=True)
    return model


def prune_to_params(dense: nn.Module, grads: dict[str, torch.Tensor], target_params: int, protected: set[int],
                    round_to: int, iters: int = 12) -> tuple[nn.Module, float]:
    """The Torch-Pruning model whose decoder has the parameter count closest to ``target_params``.

    Bisects the MLP ratio (each trial prunes a fresh copy of ``dense`` with the same gradients).

    Args:
        dense: the dense model (not modified).
        grads: :func:`taylor_gradients` of ``dense`` (the Taylor importance).
        target_params: decoder parameters the peer keeps (those of the SAAP row it is compared with).
        protected: blocks left whole.
        round_to: kept-width rounding.
        iters: bisection steps.

    Returns:
        The pruned model and its ratio.
    """
    def trial(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense)
        for n, p in model.named_parameters():
            p.grad = grads.get(n)
        return prune_mlp_channels(model, ratio, protected, round_to)

    lo, hi = 0.0, 0.99
    best: tuple[int, float, nn.Module | None] = (1 << 62, 0.0, None)
    for _ in range(iters):
        mid = (lo + hi) / 2
        model = trial(mid)
        kept = decoder_params(model)
        log.info("torch-pruning ratio %.4f: %d decoder parameters (target %d)", mid, kept, target_params)
        if abs(kept - target_params) < best[0]:
            best = (abs(kept - target_params), mid, model)
        if kept > target_params:
            lo = mid
        else:
            hi = mid
        if best[0] <= 0.002 * target_params:
            break
    assert best[2] is not None
    return best[2], best[1]
