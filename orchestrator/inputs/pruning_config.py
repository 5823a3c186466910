"""The ``pruning`` section of the run configuration: the method, its pattern and every option of the pipeline
(GBLM, SparseGPT, the least-squares re-solve, the ADMM search, block tuning, OWL allocation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from orchestrator.inputs.fields import ComputeDType, Method, Pattern, Reconstruct, _nm_explain, opt


@dataclass
class GblmConfig:
    """GBLM-Pruner options (METHODS.md section 2)."""

    alpha: float = opt(100.0, ge=0, help="weight of the gradient term (on raw gradients; `weighting: raw`)")
    norm: Literal["l1", "l2"] = opt("l1", help="`l1`: p = 1 (`sum |g|`), `l2`: p = 2 (`sqrt(sum g^2)`)")
    grad_scale: float = opt(100.0, gt=0, help="factor gradients are summed with (as the published code); divided out")
    weighting: Literal["raw", "normalized"] = opt(
        "raw", help="`raw`: the paper's terms and `alpha`; `normalized`: both terms mean 1 per layer, weighed by "
                    "`relative_alpha` (the same for any N, gradient scale or model)")
    relative_alpha: float = opt(1.0, ge=0, help="weight of the mean-1 gradient term (`weighting: normalized`)")
    grad_samples: int | None = opt(None, gt=0, help="calibration windows the gradient pass uses, evenly spaced "
                                   "over the N sampled (null, or N and more: all N); the sums are scaled to N")
    grad_dtype: ComputeDType = opt("auto", help="autocast dtype of the gradient pass's forward and backward (the "
                                   "statistics are summed in fp32); `auto`: bfloat16 where every worker's device "
                                   "computes bf16 natively, else float32")

    def alpha_for(self, method: str) -> float:
        """The gradient term's weight: ``alpha`` for raw GBLM, ``relative_alpha`` for the scale-free terms."""
        return self.alpha if method == "gblm" and self.weighting == "raw" else self.relative_alpha


@dataclass
class SparseGptConfig:
    """SparseGPT options (METHODS.md section 2)."""

    blocksize: int = opt(128, gt=0, help="columns per lazy-update block")
    percdamp: float = opt(0.01, gt=0, help="damping as a fraction of mean(diag H)")


@dataclass
class LstsqConfig:
    """The least-squares re-solve of kept weights (``pruning.reconstruct: layer``, METHODS.md section 2)."""

    solver: Literal["cg", "exact"] = opt("cg", help="`cg`: all rows at once, iterative; `exact`: Cholesky per row")
    iters: int = opt(10, gt=0, help="conjugate-gradient iterations per row: stopping early regularises the fit "
                     "(10 measured better than 30 and faster on SmolLM2, docs/benchmarks.md)")
    percdamp: float = opt(0.01, gt=0, help="damping as a fraction of mean(diag X^T X)")
    tol: float = opt(0.0, ge=0, lt=1, help="`cg`: a row stops once its residual is below this fraction of its "
                     "initial one (0: every row runs `iters`)")
    rounds: int = opt(1, gt=0, help="> 1: grow the mask in rounds, re-scoring the re-solved weights (not SparseGPT)")


@dataclass
class AdmmConfig:
    """The ADMM support search (``pruning.search: admm``; orchestrator/pruning/admm.py)."""

    rho: float = opt(0.1, gt=0, help="initial penalty, relative to the unit diagonal of the input-normalised X^T X")
    max_iters: int = opt(300, gt=0, help="most ADMM iterations per layer")
    min_iters: int = opt(30, ge=0, help="iterations before the search may stop")
    stop_tol: float = opt(3e-4, ge=0, lt=1, help="stop once less than this fraction of the kept weights changed "
                          "between two checks (every 3 iterations)")
    percdamp: float = opt(0.01, gt=0, help="ridge on X^T X during the search, as a fraction of its mean diagonal")


@dataclass
class BlockTuneConfig:
    """Block-level tuning of the kept weights (``pruning.reconstruct: block``, METHODS.md section 2)."""

    epochs: int = opt(2, gt=0, help="passes over the calibration sequences per block")
    batch: int = opt(4, gt=0, help="sequences per Adam step (over all workers)")
    lr: float = opt(3e-4, gt=0, help="Adam learning rate")


@dataclass
class OwlConfig:
    """Outlier-weighted layer-wise sparsity (``pruning.allocation: owl``, METHODS.md section 2)."""

    threshold: float = opt(5.0, gt=0, help="a Wanda score above this many times its block's mean is an outlier (M)")
    lam: float = opt(0.08, ge=0, lt=0.5, help="blocks' sparsities spread over at most 2 * lam around the target")


@dataclass
class PruningConfig:
    """What to prune and how."""

    method: Method = opt("gblm", help="`magnitude`, `wanda`, `sparsegpt`, `gblm`, `gblm-sparsegpt` (SparseGPT's OBS "
                                      "update, mask by OBS saliency + `gblm.relative_alpha` x GBLM's gradient term)")
    sparsity: float | None = opt(None, gt=0, lt=1, help="fraction pruned in every matrix (unstructured; null: 0.5)")
    pattern: Pattern = opt("unstructured", explain=_nm_explain,
                           help="`unstructured`, `2:4`, `4:8` (N:M implies sparsity N/M)")
    sequential: bool = opt(True, help="re-forward each pruned block to produce the next block's inputs")
    sweep: list[float] = opt(factory=list, help="several sparsities from one statistics pass, e.g. `[0.3, 0.5, 0.7]`")
    reconstruct: Reconstruct = opt("none", help="`layer`: re-solve each layer's kept weights to match its dense "
                                               "output on the calibration inputs (any method); `block`: then "
                                               "tune each block's kept weights to match the dense block's output")
    lstsq: LstsqConfig = field(default_factory=LstsqConfig)
    search: Literal["none", "admm"] = opt("none", help="`admm`: search each layer's mask by ADMM on its reconstruction "
                                                       "objective, from the method's mask (the gradient term weighs "
                                                       "its projection for gradient methods); needs `reconstruct`")
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    swaps: int = opt(0, ge=0, help="rounds of swap moves after the mask (and the search): each row trades a kept for "
                     "a pruned weight where that lowers its reconstruction error (N:M: inside a group); needs "
                     "`reconstruct`")
    block_tune: BlockTuneConfig = field(default_factory=BlockTuneConfig)
    allocation: Literal["uniform", "owl"] = opt("uniform", help="per-block sparsity: the same everywhere, or by "
                                                                "outlier share (OWL; unstructured, mean = target)")
    owl: OwlConfig = field(default_factory=OwlConfig)
    gblm: GblmConfig = field(default_factory=GblmConfig)
    sparsegpt: SparseGptConfig = field(default_factory=SparseGptConfig)

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` for an N:M pattern, ``None`` for unstructured."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        """The sparsity every pruned matrix must reach."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)
