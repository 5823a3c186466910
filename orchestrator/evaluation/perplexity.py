"""Perplexity evaluation (METHODS.md section 6): non-overlapping windows, batch size 1."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, progress: bool = False, desc: str = "perplexity"
               ) -> tuple[float, int]:
    """Summed next-token NLL over windows, and the number of predicted tokens.

    Args:
        model: causal LM (any device; the windows are moved to it).
        windows: ``(K, L)`` int64.
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        ``(sum_nll, tokens)`` with ``tokens = K * (L - 1)``; sums from several workers add.
    """
    total = 0.0
    tokens = 0
    device = next(model.parameters()).device
    for i in tqdm(range(windows.shape[0]), desc=desc, disable=not progress, unit="win"):
        ids = windows[i : i + 1].to(device)  # (1, L)
        logits = model(ids, use_cache=False).logits[0, :-1].float()  # (L-1, V)
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total += float(nll)
        tokens += ids.shape[1] - 1
    return total, tokens


def perplexity(model, windows: torch.Tensor, progress: bool = False, desc: str = "perplexity") -> float:
    """``exp(sum NLL / tokens)`` over ``(K, L)`` windows."""
    total, tokens = window_nll(model, windows, progress, desc)
    return math.exp(total / max(tokens, 1))
