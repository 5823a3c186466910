"""Pure pruning math: tensors in, tensors out. No Ray and no DeepSpeed here."""

from orchestrator.pruning.masks import apply_mask, matrix_mask, nm_mask, row_mask, sparsity_of
from orchestrator.pruning.methods import LayerPruneResult, prune_weight
from orchestrator.pruning.scores import gblm_score, magnitude_score, wanda_score
from orchestrator.pruning.sparsegpt import sparsegpt_prune
from orchestrator.pruning.stats import ActivationStats, GradientStats

__all__ = [
    "ActivationStats",
    "GradientStats",
    "LayerPruneResult",
    "apply_mask",
    "gblm_score",
    "magnitude_score",
    "matrix_mask",
    "nm_mask",
    "prune_weight",
    "row_mask",
    "sparsegpt_prune",
    "sparsity_of",
    "wanda_score",
]
