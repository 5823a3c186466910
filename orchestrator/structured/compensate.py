"""Weight compensation after structured removal: re-solve the consumers of removed groups.

Removing a group deletes input columns of its consumer (``o_proj`` for a KV group with its query
heads, ``down_proj`` for an MLP channel). The consumer's kept columns are then re-solved by least
squares so its output on the calibration inputs stays as close as possible to the output it had
with every column (the block's output is kept, not just the weights)::

    A = argmin_A ||X_K A^T - X W^T||^2 = W_K + W_P H_PK (H_KK + lam I)^-1,   H = X^T X

(``K`` kept columns, ``P`` removed ones; written as a correction of ``W_K`` so the damping ``lam``
only regularises the correction and nothing changes where nothing is removed).

The pass runs block by block (SparseGPT's order): block i's attention is shrunk and its ``o_proj``
compensated on the inputs that the already pruned blocks ``0..i-1`` produce, then its MLP on the
inputs that the pruned attention produces, then the pruned block's outputs feed block ``i + 1``.
Torch only (no Ray, no DeepSpeed).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from orchestrator.engine.blocks import capture_block_inputs, collect_inputs, decoder_blocks, forward_all
from orchestrator.pruning.reconstruct import output_error
from orchestrator.structured.groups import ModuleGroups, arch_spec, group_index, head_dim
from orchestrator.structured.portable import set_attention_sizes
from orchestrator.structured.shrink import keep_groups

log = logging.getLogger(__name__)


def compensate_columns(weight: torch.Tensor, keep: torch.Tensor, xtx: torch.Tensor,
                       percdamp: float = 0.01) -> torch.Tensor:
    """Least-squares re-solve of a consumer's kept input columns.

    Args:
        weight: ``(out, in)`` the consumer's weight with every column.
        keep: ``(k,)`` int64 kept column indices.
        xtx: ``(in, in)`` ``sum x x^T`` of the consumer's inputs (all columns).
        percdamp: damping of ``H_KK`` as a fraction of its mean diagonal (0: exact least squares).

    Returns:
        ``(out, k)`` the compensated weight of the kept columns, in ``weight``'s dtype.
    """
    w = weight.detach().double()  # (out, in)
    h = xtx.detach().double()  # (in, in)
    drop = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    drop[keep] = False
    if not bool(drop.any()):
        return weight[:, keep].clone()
    h_kk = h[keep][:, keep]  # (k, k)
    lam = percdamp * float(torch.diag(h_kk).mean())
    h_kk = h_kk + max(lam, 1e-12) * torch.eye(h_kk.shape[0], dtype=h.dtype, device=h.device)
    rhs = h[keep][:, drop] @ w[:, drop].T  # (k, out): H_KP W_P^T
    chol, info = torch.linalg.cholesky_ex(h_kk)
    if int(info):  # numerically indefinite (rank-deficient inputs): least squares through the pseudo-inverse
        corr = torch.linalg.lstsq(h_kk, rhs).solution
    else:
        corr = torch.cholesky_solve(rhs, chol)  # (k, out)
    return (w[:, keep] + corr.T).to(weight.dtype)


def select_by_reconstruction(weight: torch.Tensor, xtx: torch.Tensor, columns: torch.Tensor, remove: int,
                             percdamp: float = 0.01, max_rounds: int = 128) -> torch.Tensor:
    """Greedy optimal-brain-surgeon choice of the groups whose removal compensation recovers best.

    Each round removes the groups of least ``trace(W_g [H^-1]_gg^-1 W_g^T)`` (the consumer's output error
    of removing group ``g`` with every other column re-solved), then updates ``W`` and ``H^-1`` as if they
    were gone (Hassibi & Stork; ZipLM's structured form). Rounds remove ``ceil(remove / max_rounds)`` groups
    at once, so the work is bounded by ``max_rounds`` updates of ``H^-1`` however many groups go.

    Args:
        weight: ``(out, in)`` the consumer's weight.
        xtx: ``(in, in)`` ``sum x x^T`` of its inputs.
        columns: ``(G, width)`` int64 the input columns of each group.
        remove: groups to remove.
        percdamp: damping of ``H`` as a fraction of its mean diagonal.
        max_rounds: at most this many greedy rounds.

    Returns:
        ``(G - remove,)`` int64 kept group ids, sorted.
    """
    n_groups, width = columns.shape
    w = weight.detach().double().clone()  # (out, in)
    h = xtx.detach().double()
    h = h + max(percdamp * float(torch.diag(h).mean()), 1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))  # (in, in)
    columns = columns.to(h.device)
    alive = torch.ones(n_groups, dtype=torch.bool, device=h.device)
    per_round = -(-remove // max_rounds) if remove else 0
    left = remove
    while left > 0:
        if width == 1:  # one column per group: ||W_:j||^2 / [H^-1]_jj
            cost = w[:, columns[:, 0]].pow(2).sum(0) / torch.diag(hinv)[columns[:, 0]].clamp_min(1e-300)  # (G,)
        else:
            blocks = hinv[columns[:, :, None], columns[:, None, :]]  # (G, width, width)
            dead = (~alive).double()[:, None].expand(-1, width)  # (G, width): 1 on removed groups
            blocks = blocks + torch.diag_embed(dead)
            wg = w[:, columns].permute(1, 0, 2)  # (G, out, width)
            chol = torch.linalg.cholesky(blocks)  # principal blocks of an SPD inverse (dead ones: I)
            # (G, width, out): [H^-1]_gg^-1 W_g^T (a contiguous right-hand side: MKL's batched LU solve
            # with a strided one fails with two threads)
            sol = torch.cholesky_solve(wg.transpose(1, 2).contiguous(), chol)
            cost = (wg.transpose(1, 2) * sol).sum((1, 2))  # (G,)
        cost[~alive] = float("inf")
        take = torch.topk(cost, min(per_round, left), largest=False).indices  # (t,)
        idx = columns[take].reshape(-1)  # (t * width,)
        blk_inv = torch.linalg.inv(hinv[idx][:, idx])  # (t * width, t * width)
        w -= (w[:, idx] @ blk_inv) @ hinv[idx, :]
        hinv -= hinv[:, idx] @ blk_inv @ hinv[idx, :]
        alive[take] = False
        left -= take.numel()
    return torch.nonzero(alive).reshape(-1).cpu()


def _consumer(model: nn.Module, mod: ModuleGroups) -> nn.Linear:
    """The linear whose input columns hold the module's groups."""
    col = next(sl for sl in mod.slices if sl.dim == 1)
    owner = model.get_submodule(col.name.rsplit(".", 1)[0])
    assert isinstance(owner, nn.Linear), col.name
    return owner


@torch.no_grad()
def shrink_and_compensate(model: nn.Module, keeps: dict[str, torch.Tensor], mods: list[ModuleGroups],
                          calib_ids: torch.Tensor, percdamp: float = 0.01, progress: bool = False,
                          select: bool = False) -> list[dict]:
    """Shrink every module to its kept groups, compensating each consumer, block by block.

    Args:
        model: the model the ``mods`` describe (shrunk in place; call ``sync_config`` afterwards).
        keeps: module key -> ``(k,)`` kept group ids.
        mods: every module's groups, in block order (attention before MLP).
        calib_ids: ``(N, L)`` calibration sequences.
        percdamp: damping of the least-squares solves.
        progress: show a progress bar.
        select: keep as many groups as ``keeps`` says, but choose them by
            :func:`select_by_reconstruction` on the consumer's inputs instead.

    Returns:
        One row per shrunk module: its consumer's output error on the calibration inputs with the
        removed columns simply dropped (``error_dropped``) and after compensation (``error_compensated``).
    """
    t0 = time.perf_counter()
    model.config.head_dim = head_dim(model.config)  # freeze it: hidden / heads changes once heads go
    attn_module = arch_spec(model)["attn"]["module"]
    device = next(model.parameters()).device
    hidden, kwargs = capture_block_inputs(model, calib_ids.to(device))  # (N, L, d)
    rows = []
    for i, block in enumerate(tqdm(decoder_blocks(model), desc="compensate", disable=not progress)):
        for mod in (m for m in mods if m.layer == i):
            keep = torch.sort(keeps[mod.key].long()).values
            if keep.numel() == mod.num_groups:
                continue
            lin = _consumer(model, mod)
            with collect_inputs({"c": lin}, with_xtx=True) as stats:
                forward_all(block, hidden, kwargs)
            xtx = stats["c"].xtx  # (in, in)
            dense = lin.weight.detach().clone()  # (out, in)
            col = next(sl for sl in mod.slices if sl.dim == 1)
            if select:
                columns = group_index(col, torch.arange(mod.num_groups)).view(mod.num_groups, -1)  # (G, width)
                keep = select_by_reconstruction(dense, xtx, columns, mod.num_groups - keep.numel(), percdamp)
            cols = group_index(col, keep)  # (k * width,)
            new = compensate_columns(dense, cols, xtx, percdamp)  # (out, k * width)
            keep_groups(model, mod, keep)
            lin.weight.data.copy_(new)
            if mod.kind == "attn":
                set_attention_sizes(getattr(block, attn_module), model.config, int(keep.numel()), uniform=False)
            rows.append({"module": mod.key, "kept": keep.tolist() if select else None,
                         **_errors(dense, cols, new, xtx)})
        hidden = forward_all(block, hidden, kwargs)
    log.info("structured: compensated %d modules in %.1f s (mean error %.3g of the dropped columns')",
             len(rows), time.perf_counter() - t0,
             sum(r["error_compensated"] / max(r["error_dropped"], 1e-30) for r in rows) / max(len(rows), 1))
    return rows


def _errors(dense: torch.Tensor, cols: torch.Tensor, new: torch.Tensor, xtx: torch.Tensor) -> dict[str, float]:
    """The consumer's output error with the removed columns dropped and with the kept ones compensated."""
    dropped = torch.zeros_like(dense, dtype=torch.float32)  # (out, in)
    dropped[:, cols] = dense[:, cols].float()
    compensated = torch.zeros_like(dropped)
    compensated[:, cols] = new.float()
    return {"error_dropped": output_error(dropped, dense, xtx), "error_compensated": output_error(compensated, dense,
                                                                                                   xtx)}
