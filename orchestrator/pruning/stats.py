"""Calibration statistics that merge by plain addition (METHODS.md section 1).

Every accumulator carries its sample count, so partial statistics computed on
several workers combine with :meth:`merge` in any order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

GRAD_KINDS = ("abs", "sq", "sum")
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu")  # device types torch.autocast serves


@contextlib.contextmanager
def exact_fp32(device: torch.device | str) -> Iterator[None]:
    """A region where statistics are computed in full fp32 whatever the caller's context.

    Autocast is off on ``device``'s type (hooks fire inside the block forward's bf16 autocast, which
    would otherwise run ``x^T x`` in bf16) and fp32 matmuls use full precision, not TF32 (which a run
    may allow for its forwards with ``backend.tf32``); both are restored on exit.
    """
    kind = torch.device(device).type
    precision = torch.get_float32_matmul_precision()
    amp = torch.autocast(kind, enabled=False) if kind in AUTOCAST_DEVICE_TYPES else contextlib.nullcontext()
    try:
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
        with amp:
            yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


@dataclass
class ActivationStats:
    """Input statistics of one linear layer.

    Attributes:
        act_sq: ``(in,)`` fp32, sum over all tokens of ``x_j ** 2``.
        xtx: ``(in, in)`` fp64, sum over tokens of ``x x^T`` (only when ``with_xtx``): each sequence's
            ``x^T x`` is one fp32 product of a fixed shape, and the sequences are summed in fp64, so the
            sum does not depend on how sequences are batched or split over ranks (its fp32 rounding,
            what every consumer uses, is the same on one process and on any number of ranks). The
            least-squares solve amplifies the last bits of an fp32 sum's order by about 10^4 at 10 CG
            iterations.
        samples: number of calibration sequences folded in.
        tokens: number of tokens folded in.
        device: where the sums live (the layer's device).
    """

    in_features: int
    with_xtx: bool = False
    device: torch.device | str = "cpu"
    act_sq: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False, default=None)
    samples: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        self.act_sq = torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        if self.with_xtx:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs.

        Args:
            x: ``(batch, seq, in)`` or ``(seq, in)`` layer inputs, any float dtype.
        """
        if x.dim() == 2:
            x = x.unsqueeze(0)
        batch = x.shape[0]
        with exact_fp32(x.device):
            flat = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            self.act_sq += flat.pow(2).sum(dim=0)
            if self.xtx is not None:
                for seq in x.float():  # (seq, in): one fp32 product per sequence (never bf16 or TF32) ...
                    self.xtx.add_(seq.t() @ seq)  # ... summed in fp64, whatever the batching
        self.samples += batch
        self.tokens += flat.shape[0]

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Add ``other`` into ``self`` and return ``self``."""
        self.act_sq += other.act_sq
        if self.xtx is not None:
            if other.xtx is None:
                raise ValueError("cannot merge statistics without xtx into ones with xtx")
            self.xtx += other.xtx
        self.samples += other.samples
        self.tokens += other.tokens
        return self

    def input_norm(self) -> torch.Tensor:
        """``sqrt(act_sq / N)`` with N the number of sequences: Wanda's ``(in,)`` factor."""
        return torch.sqrt(self.act_sq / max(self.samples, 1))

    def hessian(self) -> torch.Tensor:
        """SparseGPT's ``H = (2 / N) * sum x x^T`` as ``(in, in)`` fp32."""
        if self.xtx is None:
            raise ValueError("hessian requested but statistics were collected without xtx")
        return self.xtx.float() * (2.0 / max(self.samples, 1))


@dataclass
class GradientStats:
    """Per-sequence gradient sums of one weight (or of a partition of it).

    Attributes:
        abs: ``sum_n |s * g_n|`` (GBLM p = 1), when requested.
        sq: ``sum_n (s * g_n) ** 2`` (GBLM p = 2, Fisher diagonal), when requested.
        sum: ``sum_n s * g_n`` (Taylor importance), when requested.
        samples: number of per-sequence gradients folded in.
        scale: ``s``, the factor applied to each gradient before folding.
        device: where the sums live.
    """

    shape: tuple[int, ...]
    kinds: tuple[str, ...] = ("abs",)
    scale: float = 1.0
    samples: int = 0
    device: torch.device | str = "cpu"
    sums: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in GRAD_KINDS]
        if bad:
            raise ValueError(f"unknown gradient statistic(s) {bad}; allowed {GRAD_KINDS}")
        self.sums = {k: torch.zeros(self.shape, dtype=torch.float32, device=self.device) for k in self.kinds}

    def update(self, grad: torch.Tensor) -> None:
        """Fold in one per-sequence gradient of shape ``shape``."""
        add_gradient(self.sums, grad, self.scale)
        self.samples += 1

    def merge(self, other: GradientStats) -> GradientStats:
        """Add ``other`` into ``self`` and return ``self``."""
        for k, v in self.sums.items():
            v += other.sums[k]
        self.samples += other.samples
        return self

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.sums[kind]


def add_gradient(sums: dict[str, torch.Tensor], grad: torch.Tensor, scale: float) -> None:
    """Fold one gradient into the named sums in place (fp32).

    Args:
        sums: map from kind (``abs``/``sq``/``sum``) to an fp32 buffer shaped like ``grad``.
        grad: one per-sequence gradient (any float dtype).
        scale: factor applied before folding (GBLM uses 100).
    """
    g = grad.detach().float()
    if scale != 1.0:
        g = g * scale
    if "abs" in sums:
        sums["abs"].add_(g.abs())
    if "sq" in sums:
        sums["sq"].addcmul_(g, g)
    if "sum" in sums:
        sums["sum"].add_(g)


def per_sample_weight_grad_stats(x: torch.Tensor, grad_out: torch.Tensor, kinds: tuple[str, ...],
                                 weights: torch.Tensor, compute_dtype: torch.dtype = torch.float32
                                 ) -> dict[str, torch.Tensor]:
    """Statistics of the per-sample weight gradients of a bias-free linear, from its input and output grad.

    For ``y = x @ W.T`` the gradient of sample ``b`` is ``G_b = grad_out_b.T @ x_b``; this folds
    ``w_b * G_b`` over the batch without ever forming the batch-summed gradient, so a batch of ``B``
    sequences yields the same sums as ``B`` batch-1 passes (sequences do not interact in a causal LM).

    Args:
        x: ``(B, T, in)`` the linear's input.
        grad_out: ``(B, T, out)`` the loss gradient w.r.t. the linear's output, each sample's loss
            being that sequence's own mean token loss.
        kinds: subset of ``("abs", "sq", "sum")``.
        weights: ``(B,)`` per-sample factors (the GBLM scale; 0 for padding samples).
        compute_dtype: dtype of the per-sample product (bf16 in a bf16 gradient pass, as autograd's
            own weight gradient there); the statistics are folded in fp32.

    Returns:
        kind -> fp32 ``(out, in)`` sum over the batch.
    """
    bad = [k for k in kinds if k not in GRAD_KINDS]
    if bad:
        raise ValueError(f"unknown gradient statistic(s) {bad}; allowed {GRAD_KINDS}")
    with exact_fp32(x.device):  # the product in ``compute_dtype`` as asked, not what an enclosing autocast picks
        g = torch.bmm(grad_out.to(compute_dtype).transpose(1, 2), x.to(compute_dtype)).float()  # (B, out, in)
        g.mul_(weights.to(g.dtype).view(-1, 1, 1))
        out = {}
        if "sum" in kinds:
            out["sum"] = g.sum(0)
        if "sq" in kinds:
            out["sq"] = torch.einsum("boi,boi->oi", g, g)
        if "abs" in kinds:
            out["abs"] = g.abs_().sum(0)
    return out
