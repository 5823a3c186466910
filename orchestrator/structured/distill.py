"""Distillation targets for recovery: the dense model's next-token distribution, top-k per position.

Recovery by distillation (``structured.recovery.loss: kd``) trains the pruned model toward the dense
model's distribution instead of the corpus's next token. The dense model runs once, before pruning,
over exactly the windows the recovery's steps will draw (:func:`~orchestrator.structured.recovery.step_batches`),
and only its ``kd_topk`` largest logits per position are kept, so the targets are small enough to ship
to any number of recovery ranks (``windows x S x k`` values and token ids) and no rank needs the dense
model beside the pruned one. The loss is the KL divergence from the teacher's top-k distribution
(renormalised at temperature ``T``) to the student's full softmax, times ``T^2`` (Hinton et al.).
Torch only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class DistillTargets:
    """The dense model's top-k next-token logits on the windows recovery uses.

    Attributes:
        logits: ``(U, S, k)`` float32 the largest logits per position of each used window.
        tokens: ``(U, S, k)`` int64 their token ids.
        slot: ``(M,)`` int64 row of each training window in ``logits`` (-1: never drawn).
        temperature: softmax temperature of the loss.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    slot: torch.Tensor
    temperature: float = 1.0

    def of(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``((S, k) logits, (S, k) token ids)`` of one training window."""
        row = int(self.slot[window])
        if row < 0:
            raise KeyError(f"distillation targets: window {window} was not prepared")
        return self.logits[row], self.tokens[row]


@torch.no_grad()
def distill_targets(teacher: nn.Module, windows: torch.Tensor, used: torch.Tensor, topk: int,
                    temperature: float = 1.0, progress: bool = False) -> DistillTargets:
    """Run the dense model over the used windows and keep its top-k logits.

    Args:
        teacher: the dense model (before pruning).
        windows: ``(M, S)`` int64 training windows.
        used: window ids the recovery draws (any shape, repeats allowed).
        topk: logits kept per position (at most the vocabulary).
        temperature: softmax temperature of the loss.
        progress: show a progress bar.
    """
    ids = torch.unique(used.reshape(-1))  # (U,) sorted
    slot = torch.full((windows.shape[0],), -1, dtype=torch.long)
    slot[ids] = torch.arange(ids.numel())
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    vals, toks = [], []
    for w in tqdm(ids.tolist(), desc="distillation targets", disable=not progress):
        logits = teacher(input_ids=windows[w][None].to(device), use_cache=False).logits[0].float()  # (S, V)
        top = torch.topk(logits, min(topk, logits.shape[-1]), dim=-1)
        vals.append(top.values.cpu())
        toks.append(top.indices.cpu())
    teacher.train(was_training)
    log.info("distillation targets: %d windows x %d positions x top %d", ids.numel(), windows.shape[1], topk)
    return DistillTargets(torch.stack(vals), torch.stack(toks), slot, temperature)


def distill_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, target_tokens: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of ``T^2 KL(p_teacher || q_student)`` on the teacher's top-k tokens.

    Args:
        student_logits: ``(S, V)`` the student's logits.
        target_logits: ``(S, k)`` the teacher's largest logits.
        target_tokens: ``(S, k)`` their token ids.
        temperature: softmax temperature ``T``.

    Returns:
        Scalar fp32 loss.
    """
    t = temperature
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, target_tokens)  # (S, k)
    log_p = torch.log_softmax(target_logits.float() / t, dim=-1)  # (S, k) renormalised over the top k
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
