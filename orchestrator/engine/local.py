"""Single-process engine (``backend: local``): the reference the distributed engine reproduces.

Phases: a per-sequence gradient pass on the dense model (GBLM), then the block-sequential
pass: statistics from the unpruned block, prune all its linears, re-forward the pruned
block to produce the next block's inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from orchestrator.engine.block_step import StepContext, block_configs, block_step, probe_step, uses_activations
from orchestrator.engine.blocks import CPU, block_linears, block_prefix, capture_block_inputs, decoder_blocks
from orchestrator.engine.checkpointing import checkpointed_blocks
from orchestrator.engine.device import Placement
from orchestrator.inputs.config import PruningConfig
from orchestrator.pruning.lmloss import lm_loss_with_grad, plain_head
from orchestrator.pruning.methods import LayerPruneResult, gradient_kinds, gradient_sampling
from orchestrator.pruning.stats import add_gradient

log = logging.getLogger(__name__)


@dataclass
class PruneOutcome:
    """What a pruning pass produced.

    Attributes:
        masks: full weight name (``model.layers.0.mlp.up_proj.weight``) -> bool mask, True = pruned.
        layers: one report row per pruned linear.
        phases: wall-clock seconds per phase.
        dtypes: the autocast dtypes the pass ran with (:meth:`RunConfig.compute_dtypes`).
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


def pruned_weight_names(model: nn.Module) -> list[str]:
    """Full names of every weight the run prunes (each linear inside the decoder blocks)."""
    prefix = block_prefix(model)
    names = []
    for i, block in enumerate(decoder_blocks(model)):
        names += [f"{prefix}.{i}.{n}.weight" for n in block_linears(block)]
    return names


def logits_free(model: nn.Module) -> bool:
    """Whether the loss can skip the logits: a decoder under a plain-matmul output embedding."""
    return (plain_head(model.config) and model.base_model is not model
            and model.get_output_embeddings() is not None)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of each one's mean next-token loss (``(B, T)`` ids of equal length).

    Computed without materialising the logits (:mod:`orchestrator.pruning.lmloss`) when the
    head is a plain matmul; otherwise through the model's own loss.
    """
    if logits_free(model):
        head = model.get_output_embeddings()
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
        return lm_loss_with_grad(hidden, head.weight, ids, getattr(head, "bias", None))
    return model(ids, labels=ids, use_cache=False).loss * ids.shape[0]


def gradient_pass(model: nn.Module, input_ids: torch.Tensor, kinds: tuple[str, ...], scale: float,
                  progress: bool = True, dtype: str = "float32", checkpoint: bool = False
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sequence gradient sums for every pruned weight (batch size 1, :func:`causal_lm_loss`).

    Args:
        model: dense causal LM; its parameters' ``requires_grad`` is restored afterwards.
        input_ids: ``(N, L)`` calibration sequences on the model's device.
        kinds: subset of ``("abs", "sq", "sum")``.
        scale: factor applied to each per-sequence gradient before folding (GBLM: 100).
        progress: show a progress bar.
        dtype: autocast dtype of the forward (and so of the backward); the sums stay fp32.
        checkpoint: recompute each block's activations in the backward
            (:func:`~orchestrator.engine.checkpointing.checkpointed_blocks`): the same sums, a fraction of the memory.

    Returns:
        weight name -> kind -> fp32 tensor shaped like the weight, on the model's device.
    """
    names = set(pruned_weight_names(model))
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    sums: dict[str, dict[str, torch.Tensor]] = {
        n: {k: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for k in kinds}
        for n in names
    }
    handles = []
    place = Placement.of(input_ids.device, dtype)
    for n, p in params.items():
        p.requires_grad_(n in names)
        if n in names:
            def hook(param, _n=n):
                add_gradient(sums[_n], param.grad, scale)
                param.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
    try:
        with checkpointed_blocks(model, checkpoint):
            for i in tqdm(range(input_ids.shape[0]), desc="gradient pass", disable=not progress, unit="seq"):
                ids = input_ids[i : i + 1]
                with place.autocast():
                    loss = causal_lm_loss(model, ids)
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(saved[n])
            p.grad = None
    return sums


def block_grads(grads: dict[str, dict[str, torch.Tensor]] | None, kinds: tuple[str, ...], prefix: str,
                index: int) -> Callable[[str], torch.Tensor | None]:
    """Local linear name -> its gradient statistic in block ``index`` (None without gradients)."""
    def grad_of(name: str) -> torch.Tensor | None:
        if not kinds or grads is None:
            return None
        return grads[f"{prefix}.{index}.{name}.weight"][kinds[0]]

    return grad_of


def block_sequential(model: nn.Module, input_ids: torch.Tensor, cfg: PruningConfig,
                     grads: dict[str, dict[str, torch.Tensor]] | None = None,
                     place: Placement = CPU, progress: bool = True) -> PruneOutcome:
    """Prune every decoder block in order, in place (one :func:`block_step` per block).

    Args:
        model: the model to prune, on ``place.device``.
        input_ids: ``(N, L)`` calibration sequences.
        cfg: pruning options (``sequential: false`` takes all statistics from the dense model).
        grads: output of :func:`gradient_pass` when the method needs gradients.
        place: device and autocast dtype of block forwards (statistics stay fp32).
        progress: show a progress bar.
    """
    out = PruneOutcome()
    kind = gradient_kinds(cfg.method, cfg.gblm.norm)
    prefix = block_prefix(model)
    hidden, kwargs = (capture_block_inputs(model, place.put(input_ids)) if uses_activations(cfg)
                      else (None, {}))  # (N, L, H)
    blocks = decoder_blocks(model)
    probes = None
    if cfg.allocation == "owl":
        probes, h = [], hidden
        for block in tqdm(blocks, desc="OWL probe", disable=not progress):
            probe = probe_step(block, h, kwargs, place, cfg.owl.threshold)
            probes.append((probe.outliers, probe.total))
            h = probe.hidden
    cfgs = block_configs(cfg, probes, len(blocks))
    for i, block in enumerate(tqdm(blocks, desc=f"{cfg.method} blocks", disable=not progress)):
        ctx = StepContext(cfgs[i], place, grads=block_grads(grads, kind, prefix, i))
        step = block_step(block, hidden, kwargs, ctx)
        hidden = step.hidden
        add_results(out, prefix, i, step.results[0])
    return out


def add_results(out: PruneOutcome, prefix: str, index: int, results: dict[str, LayerPruneResult]) -> None:
    """Fold one block's results (local names) into ``out`` under full weight names (masks on the CPU)."""
    for name, res in results.items():
        full = f"{prefix}.{index}.{name}.weight"
        out.masks[full] = res.mask.cpu()
        out.layers.append(layer_row(full, res))


def layer_row(full_name: str, res: LayerPruneResult) -> dict:
    """One report row for a pruned weight."""
    return {
        "name": full_name,
        "shape": list(res.mask.shape),
        "sparsity": float(res.mask.float().mean()),
        "zeros": int((res.weight == 0).sum()),  # pruned, plus kept weights that are exactly zero
        "score_mean": res.score_mean,
    }


def method_gradients(model: nn.Module, input_ids: torch.Tensor, cfg: PruningConfig, place: Placement = CPU,
                     progress: bool = True, checkpoint: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The pruning method's gradient statistics: :func:`gradient_pass` over the windows ``gblm.grad_samples``
    selects (:func:`~orchestrator.pruning.methods.gradient_sampling`), scaled to estimate the sums over all of
    ``input_ids`` ``(N, L)``."""
    kinds = gradient_kinds(cfg.method, cfg.gblm.norm)
    rows, scale = gradient_sampling(int(input_ids.shape[0]), cfg.gblm.grad_samples, cfg.gblm.norm, cfg.gblm.grad_scale)
    ids = input_ids if rows is None else input_ids[list(rows)]  # (K, L)
    return gradient_pass(model, place.put(ids), kinds, scale, progress, cfg.gblm.grad_dtype, checkpoint)


def run_local(model: nn.Module, input_ids: torch.Tensor, cfg: PruningConfig, place: Placement = CPU,
              progress: bool = True, checkpoint: bool = False) -> PruneOutcome:
    """The whole single-process pruning job on a loaded model on ``place.device`` (modified in place);
    ``checkpoint``: recompute block activations in the gradient pass's backward."""
    phases: dict[str, float] = {}
    grads = None
    if gradient_kinds(cfg.method, cfg.gblm.norm):
        t0 = time.perf_counter()
        grads = method_gradients(model, input_ids, cfg, place, progress, checkpoint)
        phases["gradient_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = block_sequential(model, input_ids, cfg, grads, place, progress)
    phases["block_pass"] = time.perf_counter() - t0
    outcome.phases = phases
    return outcome
