"""Recovery after structured pruning: LoRA "group fine-tuning", merged back into the weights.

Blocks are trained group by group (``blocks_per_group`` consecutive blocks at a time,
first to last): LoRA adapters (rank 8, alpha 16, dropout 0.05 by default) on the seven
projections of those blocks only, AdamW, next-token loss on calibration text (forwards
under bf16 autocast by default: the CPU has native bf16 dot products); then the
adapters are merged so the result is a plain (shrunk) checkpoint again.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from orchestrator.blocks import block_prefix, decoder_blocks
from orchestrator.config import StructuredRecoveryConfig
from orchestrator.modeling import TORCH_DTYPES

log = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def training_windows(calib_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut ``(N, L)`` calibration sequences into ``(M, seq_len)`` training windows (remainders dropped)."""
    n, length = calib_ids.shape
    seq_len = min(seq_len, length)
    per = length // seq_len
    return calib_ids[:, : per * seq_len].reshape(n * per, seq_len)


def recover(model: nn.Module, calib_ids: torch.Tensor, cfg: StructuredRecoveryConfig,
            progress: bool = False) -> tuple[nn.Module, dict]:
    """LoRA group fine-tuning of a (shrunk) causal LM; adapters merged back.

    Args:
        model: the pruned model (trained in place; the merged model is returned).
        calib_ids: ``(N, L)`` int64 calibration sequences.
        cfg: recovery options.
        progress: show a progress bar.

    Returns:
        ``(model, report)``: the merged plain model and per-group loss curves and times.
    """
    from peft import LoraConfig, get_peft_model

    amp = None if cfg.forward_dtype == "float32" else TORCH_DTYPES[cfg.forward_dtype]
    windows = training_windows(calib_ids, cfg.seq_len)  # (M, S)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    prefix = block_prefix(model).replace(".", r"\.")
    n_blocks = len(decoder_blocks(model))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    torch.manual_seed(cfg.seed)
    groups = []
    step_no = 0
    t0 = time.perf_counter()
    for start in range(0, n_blocks, cfg.blocks_per_group):
        layers = list(range(start, min(n_blocks, start + cfg.blocks_per_group)))
        regex = rf"{prefix}\.({'|'.join(map(str, layers))})\..*\.({'|'.join(PROJECTIONS)})"
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=regex, bias="none")
        peft_model = get_peft_model(model, lcfg)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        peft_model.train()
        losses = []
        for _ in tqdm(range(cfg.steps_per_group), desc=f"LoRA blocks {layers[0]}-{layers[-1]}",
                      disable=not progress):
            ids = windows[order[step_no % windows.shape[0]]][None]  # (1, S)
            step_no += 1
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):  # weights and optimiser stay fp32
                loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model = peft_model.merge_and_unload()
        groups.append({"blocks": [layers[0], layers[-1]], "losses": losses})
        log.info("LoRA blocks %d-%d: loss %.3f -> %.3f", layers[0], layers[-1], losses[0], losses[-1])
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, True))
    model.eval()
    return model, {"groups": groups, "seconds": time.perf_counter() - t0, "steps": step_no}
