"""The causal-LM loss of a gradient pass without materialising the logits (pure torch).

``model(ids, labels=ids).loss`` builds ``(B, T, V)`` fp32 logits, their log-softmax and its
gradient: three buffers of ``B * T * V * 4`` bytes (1.2 GiB for 4 x 512 tokens and SmolLM2's
49,152-token vocabulary, 25 GiB for 4 x 4096 tokens and Llama-3's 128k). The gradient pass only
needs the gradient with respect to the final hidden states, so :func:`chunked_lm_loss` takes
the hidden states and the output-embedding weight, walks the predicted positions in chunks
whose logits fit one reused buffer, and computes the loss and ``d loss / d hidden`` in the same
sweep (``(softmax - onehot) @ W``, the target entry as minus the sum of the other
probabilities, which stays accurate where fp32 ``p - 1`` cancels). :class:`PrecomputedLoss`
hands that gradient to autograd, so ``loss.backward()`` continues into the decoder exactly as
after the HF loss.

The loss is the sum over sequences of each sequence's mean next-token loss (the HF loss of a
batch of equal-length sequences times ``B``), so every sequence's gradient equals its own
batch-1 gradient.
"""

from __future__ import annotations

import contextlib

import torch

from orchestrator.pruning.stats import AUTOCAST_DEVICE_TYPES

#: logits elements per chunk (fp32: 32 MiB)
CHUNK_ELEMENTS = 1 << 23


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                    bias: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-sequence mean next-token losses and its gradient w.r.t. ``hidden``.

    Args:
        hidden: ``(B, T, H)`` final hidden states (after the last norm), any float dtype.
        weight: ``(V, H)`` output-embedding (LM head) weight.
        ids: ``(B, T)`` token ids; position ``t`` predicts ``ids[:, t + 1]``.
        bias: optional ``(V,)`` LM-head bias.
        chunk_elements: logits elements computed at once (memory bound of the sweep).

    Returns:
        ``(loss, grad)``: fp32 scalar and ``(B, T, H)`` gradient in ``hidden``'s dtype (zero at the
        last position, which predicts nothing).
    """
    bsz, seq, width = hidden.shape
    if seq < 2:
        raise ValueError(f"chunked_lm_loss needs at least 2 positions, got {seq}")
    vocab = weight.shape[0]
    w = weight.detach().float()  # (V, H)
    b = None if bias is None else bias.detach().float()
    h = hidden.detach()[:, :-1].reshape(-1, width)  # (N, H), N = B * (T - 1)
    target = ids[:, 1:].reshape(-1).to(hidden.device)  # (N,)
    n = h.shape[0]
    rows = max(1, min(n, chunk_elements // vocab))
    buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)  # (rows, V) reused
    grad_rows = torch.empty(n, width, dtype=torch.float32, device=hidden.device)  # (N, H)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        logits = buf[: hi - lo]  # (r, V)
        torch.mm(h[lo:hi].float(), w.t(), out=logits)
        if b is not None:
            logits.add_(b)
        lse = torch.logsumexp(logits, dim=1)  # (r,)
        picked = logits.gather(1, target[lo:hi, None]).squeeze(1)  # (r,)
        total += (lse - picked).sum(dtype=torch.float64)
        logits.sub_(lse[:, None]).exp_()  # softmax in place
        # d/dlogit_target = p_target - 1 = -(sum of the other probabilities): summing the others
        # avoids the cancellation of p_target - 1 when the model is confident (p_target ~ 1)
        at = (torch.arange(hi - lo, device=logits.device), target[lo:hi])
        logits[at] = 0.0
        logits[at] = -logits.sum(dim=1)
        torch.mm(logits, w, out=grad_rows[lo:hi])
    inv = 1.0 / (seq - 1)  # each sequence's loss is its mean over T - 1 predictions
    grad = torch.zeros(bsz, seq, width, dtype=torch.float32, device=hidden.device)  # (B, T, H)
    grad[:, :-1] = grad_rows.view(bsz, seq - 1, width).mul_(inv)
    return (total * inv).float(), grad.to(hidden.dtype)


class PrecomputedLoss(torch.autograd.Function):
    """A loss whose gradient w.r.t. its input was computed in the forward (see :func:`chunked_lm_loss`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(grad)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def lm_loss_with_grad(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                      bias: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """:func:`chunked_lm_loss` as a differentiable scalar: ``backward()`` flows into ``hidden``.

    The loss sweep itself stays fp32 under an enclosing autocast (a bf16 gradient pass).
    """
    kind = hidden.device.type
    amp = kind in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(kind)  # other backends have no autocast
    with torch.autocast(kind, enabled=False) if amp else contextlib.nullcontext():
        loss, grad = chunked_lm_loss(hidden, weight, ids, bias, chunk_elements)
    return PrecomputedLoss.apply(hidden, loss, grad)


def plain_head(config) -> bool:
    """Whether a model's logits are exactly ``hidden @ W.T (+ b)`` (no soft-capping or scaling)."""
    special = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return not any(getattr(config, k, None) not in (None, 1, 1.0) for k in special)
