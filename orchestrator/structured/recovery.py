"""Recovery after structured pruning: LoRA "group fine-tuning", merged back into the weights.

The decoder blocks are cut into groups of ``blocks_per_group`` consecutive blocks, each with
its own LoRA adapters (rank 8, alpha 16, dropout 0.05 by default) on the seven projections.
``schedule: joint`` trains every group's adapters at once on the full next-token loss (one
backward serves all groups: the cheapest way to a given loss); ``sequential`` trains the
groups one after the other, first to last, merging each before the next (``steps`` split over
the groups). AdamW with linear warm-up and cosine decay, gradient norm clipped to 1, forwards
under bf16 autocast by default (the CPU has native bf16 dot products). After training the
adapters are merged, so the result is a plain (shrunk) checkpoint again.

Every step takes ``batch_size`` training windows (seeded epochs of permutations). Each window
is its own micro-batch with its own dropout seed derived from ``(seed, step, position in the
batch)``, so the gradient of a step does not depend on how the windows are spread over
workers: :mod:`actors.recovery` runs the same :func:`train` on N Ray actors that all-reduce
the adapter gradients, and gets the weights of the single-process run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from orchestrator.engine.blocks import block_prefix, decoder_blocks
from orchestrator.engine.device import Placement
from orchestrator.inputs.config import RunConfig, StructuredRecoveryConfig
from orchestrator.structured.distill import DistillTargets, distill_loss

log = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

AllReduce = Callable[[torch.Tensor], None]
"""Sums a flat fp32 tensor over all workers in place (identity for one process)."""


def training_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut ``(N, L)`` sequences into ``(M, seq_len)`` training windows (remainders dropped)."""
    n, length = ids.shape
    seq_len = min(seq_len, length)
    per = length // seq_len
    return ids[:, : per * seq_len].reshape(n * per, seq_len)


def recovery_windows(cfg: RunConfig, calib_ids: torch.Tensor) -> torch.Tensor:
    """Training windows ``(M, seq_len)`` for recovery, from ``structured.recovery.source``.

    ``None`` reads ``calibration.source`` again (generated calibration: its windows), and
    ``calibration`` re-cuts the calibration windows; otherwise up to ``num_samples`` seeded
    windows of the text corpus (fewer when it is smaller). Never the evaluation corpus
    unless the user names it.
    """
    r = cfg.structured.recovery
    source = r.source if r.source is not None else cfg.calibration.source
    if source in ("calibration", "generate"):
        return training_windows(calib_ids, r.seq_len)
    from orchestrator.inputs.data import (
        leading_special_tokens,
        load_texts,
        num_windows,
        sample_windows,
        tokenize_corpus,
    )
    from orchestrator.inputs.models import load_tokenizer, materialize

    c = cfg.calibration
    tok = load_tokenizer(materialize(cfg.model), cfg.model)
    field = "structured.recovery.source" if r.source is not None else "calibration.source"
    texts = load_texts(source, c.text_column, field, c.hub_config, c.split, c.revision)
    tokens = tokenize_corpus(texts, tok)
    prefix = leading_special_tokens(tok)
    n = min(r.num_samples, num_windows(tokens, r.seq_len, prefix))
    windows = sample_windows(tokens, r.seq_len, n, r.seed, field, prefix)
    log.info("recovery: %d windows of %d tokens from %s", n, r.seq_len, source)
    return windows


def phases(n_blocks: int, r: StructuredRecoveryConfig) -> list[tuple[list[list[int]], int]]:
    """The training phases: ``[(groups of block ids trained together, steps)]``.

    ``joint``: one phase with every group; ``sequential``: one phase per group, ``steps``
    spread as evenly as possible (earlier groups get the remainder, every group at least one).
    """
    groups = [list(range(s, min(n_blocks, s + r.blocks_per_group))) for s in range(0, n_blocks, r.blocks_per_group)]
    if r.schedule == "joint":
        return [(groups, r.steps)]
    base, extra = divmod(r.steps, len(groups))
    return [([g], max(1, base + (i < extra))) for i, g in enumerate(groups)]


def step_batches(n_windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` window ids: consecutive seeded permutations (epochs), cut in steps."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n_windows, generator=gen) for _ in range(-(-need // n_windows))]
    return torch.cat(perms)[:need].view(steps, batch_size)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 10% at the last step."""
    w = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w - 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lora_config(model: nn.Module, blocks: list[int], r: StructuredRecoveryConfig):
    """A peft ``LoraConfig`` on the seven projections of the given blocks."""
    from peft import LoraConfig

    prefix = block_prefix(model).replace(".", r"\.")
    regex = rf"{prefix}\.({'|'.join(map(str, blocks))})\..*\.({'|'.join(PROJECTIONS)})"
    return LoraConfig(r=r.rank, lora_alpha=r.alpha, lora_dropout=r.dropout, target_modules=regex, bias="none")


@torch.no_grad()
def init_adapters(peft_model: nn.Module, seed: int) -> None:
    """peft's initialisation (A: kaiming-uniform, a = sqrt(5), i.e. U(+-1/sqrt(in)); B: 0), from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(peft_model.named_parameters()):
        if "lora_A" in name:  # (r, in)
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
        elif "lora_B" in name:  # (out, r)
            p.zero_()


def _lora_bases(peft_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m.get_base_layer() for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def _cast_base(peft_model: nn.Module, amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Hold the frozen base weights of the adapted layers in the autocast dtype while training.

    Autocast would cast them on every forward anyway (same numerics); casting once saves that
    copy. Returns the fp32 originals for :func:`_restore_base` (the merge happens in fp32).
    """
    if amp is None:
        return {}
    saved = {}
    for name, base in _lora_bases(peft_model).items():
        saved[name] = base.weight.data
        base.weight.data = base.weight.data.to(amp)
    return saved


@torch.no_grad()
def _restore_base(peft_model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, base in _lora_bases(peft_model).items():
        if name in saved:
            base.weight.data = saved[name]


def dropout_seed(seed: int, step: int, pos: int) -> int:
    """The dropout seed of the window at batch position ``pos`` of optimiser step ``step``."""
    return (seed * 1_000_003 + step) * 65_537 + pos


def window_loss(model: nn.Module, windows: torch.Tensor, window: int, teacher: DistillTargets | None
                ) -> torch.Tensor:
    """The training loss of one window: next-token cross-entropy, or distillation toward ``teacher``.

    Args:
        model: the (adapted) model, called under the caller's autocast.
        windows: ``(M, S)`` int64 training windows.
        window: which one.
        teacher: the dense model's targets (``loss: kd``); None: cross-entropy.
    """
    ids = windows[window][None]  # (1, S)
    if teacher is None:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    logits = model(input_ids=ids, use_cache=False).logits[0]  # (S, V)
    t_logits, t_tokens = teacher.of(window)  # (S, k) each
    return distill_loss(logits, t_logits.to(logits.device), t_tokens.to(logits.device), teacher.temperature)


def used_windows(n_windows: int, n_blocks: int, r: StructuredRecoveryConfig) -> torch.Tensor:
    """``(T, B)`` the window ids every step of the recovery draws (what distillation targets must cover)."""
    return step_batches(n_windows, sum(s for _, s in phases(n_blocks, r)), r.batch_size, r.seed)


def train(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig, rank: int = 0, world: int = 1,
          all_reduce: AllReduce | None = None, progress: bool = False, teacher: DistillTargets | None = None
          ) -> tuple[nn.Module, list[tuple[list[int], dict[str, torch.Tensor]]], dict]:
    """LoRA group fine-tuning on this worker's share of every step's windows.

    Args:
        model: the pruned model (trained in place; the merged model is returned).
        windows: ``(M, S)`` int64 training windows (the same on every worker).
        r: recovery options.
        rank: this worker's rank; it takes the windows at batch positions ``rank, rank + world, ...``.
        world: number of workers.
        all_reduce: sums a flat tensor over the workers in place (required when ``world > 1``).
        progress: show a progress bar.
        teacher: distillation targets (``r.loss: kd``, from :func:`~orchestrator.structured.distill.distill_targets`).

    Returns:
        ``(model, adapters, report)``: the merged plain model, the adapter weights of every phase as
        ``(blocks, peft state dict)`` in training order (:func:`apply_adapters` replays the merges),
        and the loss curve (mean loss per step over the whole batch), steps and seconds.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    if world > 1 and all_reduce is None:
        raise ValueError("train: world > 1 needs an all_reduce")
    if (r.loss == "kd") != (teacher is not None):
        raise ValueError(f"train: structured.recovery.loss={r.loss!r} {'needs' if teacher is None else 'takes no'} "
                         "distillation targets")
    place = Placement.of(windows.device, r.forward_dtype)  # the model and the windows live on one device
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = phases(len(decoder_blocks(model)), r)
    batches = step_batches(windows.shape[0], sum(s for _, s in plan), r.batch_size, r.seed)  # (T, B)
    adapters, report_phases = [], []
    t0, step = time.perf_counter(), 0
    with torch.random.fork_rng(devices=[]):  # adapter init and dropout seeds leave the caller's RNG alone
        for p_no, (groups, steps) in enumerate(plan):
            blocks = [b for g in groups for b in g]
            peft_model = get_peft_model(model, lora_config(model, blocks, r))
            init_adapters(peft_model, r.seed + p_no)  # same initial adapters on every worker
            fp32_base = _cast_base(peft_model, place.autocast_dtype)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=r.lr)
            peft_model.train()
            losses = []
            for local in tqdm(range(steps), desc=f"LoRA blocks {blocks[0]}-{blocks[-1]}", disable=not progress):
                batch = batches[step]  # (B,)
                loss_sum = torch.zeros((), device=place.device)
                for pos in range(rank, batch.numel(), world):
                    torch.manual_seed(dropout_seed(r.seed, step, pos))
                    with place.autocast():  # adapters, optimiser stay fp32
                        loss = window_loss(peft_model, windows, int(batch[pos]), teacher)
                    (loss / batch.numel()).backward()  # equal-length windows: batch mean = mean of means
                    loss_sum += loss.detach().float()
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in params] + [loss_sum.reshape(1)])  # (P + 1,)
                if world > 1:
                    all_reduce(flat)
                off = 0
                for p in params:
                    p.grad = flat[off: off + p.numel()].view_as(p).clone()
                    off += p.numel()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                for g in opt.param_groups:
                    g["lr"] = r.lr * lr_factor(local, steps, r.warmup)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(flat[-1]) / batch.numel())
                step += 1
            _restore_base(peft_model, fp32_base)
            adapters.append((blocks, {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}))
            model = peft_model.merge_and_unload()
            report_phases.append({"blocks": [[g[0], g[-1]] for g in groups], "steps": steps,
                                  "loss_first": losses[0], "loss_last": losses[-1], "losses": losses})
            log.info("LoRA blocks %d-%d: loss %.3f -> %.3f (%d steps)", blocks[0], blocks[-1],
                     sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:]), steps)
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, True))
    model.eval()
    seconds = time.perf_counter() - t0
    report = {"schedule": r.schedule, "phases": report_phases, "steps": step, "batch_size": r.batch_size,
              "seq_len": int(windows.shape[1]), "windows": int(windows.shape[0]), "lr": r.lr, "loss": r.loss,
              "tokens": step * r.batch_size * int(windows.shape[1]), "workers": world, "seconds": seconds}
    return model, adapters, report


@torch.no_grad()
def apply_adapters(model: nn.Module, adapters: list[tuple[list[int], dict[str, torch.Tensor]]],
                   r: StructuredRecoveryConfig) -> nn.Module:
    """Replay :func:`train`'s merges on a copy-identical model (e.g. with adapters trained elsewhere).

    Args:
        model: the model as it was before training.
        adapters: ``(blocks, peft state dict)`` per phase, in training order.
        r: the recovery options the adapters were trained with.

    Returns:
        The merged plain model.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for blocks, state in adapters:
        peft_model = get_peft_model(model, lora_config(model, blocks, r))
        result = set_peft_model_state_dict(peft_model, state)
        if result.unexpected_keys:
            raise ValueError(f"apply_adapters: unexpected adapter weights {result.unexpected_keys[:4]}")
        model = peft_model.merge_and_unload()
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, True))
    return model.eval()


#: data-parallel recovery on actors: ``(model, windows, options, teacher) -> (merged model, report)``
DistributedRecovery = Callable[[nn.Module, torch.Tensor, StructuredRecoveryConfig, DistillTargets | None],
                               tuple[nn.Module, dict]]


def recover(model: nn.Module, windows: torch.Tensor, r: StructuredRecoveryConfig, progress: bool = False,
            distributed: DistributedRecovery | None = None, teacher: DistillTargets | None = None
            ) -> tuple[nn.Module, dict]:
    """LoRA group fine-tuning of a (shrunk) causal LM; adapters merged back.

    Args:
        model: the pruned model (trained in place; the merged model is returned).
        windows: ``(M, S)`` int64 training windows (see :func:`recovery_windows`).
        r: recovery options; ``workers > 1`` or ``zero3`` trains on actors through ``distributed``.
        progress: show progress bars.
        distributed: the coordinator's data-parallel recovery (required when ``r.workers > 1`` or ``r.zero3``).
        teacher: distillation targets (``r.loss: kd``).

    Returns:
        ``(model, report)``: the merged plain model and the loss curves, steps and times.
    """
    if r.workers > 1 or r.zero3:
        if distributed is None:
            raise ValueError("recover: structured.recovery.workers > 1 or zero3 needs a distributed recovery")
        return distributed(model, windows, r, teacher)
    model, _, report = train(model, windows, r, progress=progress, teacher=teacher)
    return model, report
