"""Generation speed: prefill and decode tokens/s, and matmul FLOPs per token.

Timing is a manual greedy loop on the model's KV cache (the work ``generate`` does, without
its per-step logits processing): the *prefill* is one forward over the whole prompt (with the
cache, keeping only the last logits), the *decode* is the following one-token steps. The
prompt is seeded random token ids (speed does not depend on the text). Several models are
measured interleaved (model A, model B, model A, ... per repeat) so that drifting machine load
hits all of them alike; every number is a median over repeats, after a short warm-up.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import torch

from orchestrator.errors import UsageError
from orchestrator.structured.portable import SIZES_KEY

log = logging.getLogger(__name__)


def _linear_flops(model: torch.nn.Module) -> int:
    return 2 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def _config_flops(cfg) -> int:
    """LLaMA-like configs (q/k/v/o, gate/up/down, lm_head); per-layer sizes after structured pruning."""
    try:
        hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or hidden // heads
        inter = cfg.intermediate_size
    except AttributeError as exc:
        raise UsageError(f"matmul_flops_per_token: not a LLaMA-like config ({exc}); pass the model instead") from None
    n_rep = heads // kv
    sizes = getattr(cfg, SIZES_KEY, None) or [{"kv_heads": kv, "intermediate": inter}] * layers
    total = hidden * vocab  # lm_head
    for s in sizes:
        q, k = s["kv_heads"] * n_rep * hd, s["kv_heads"] * hd
        total += hidden * q + 2 * hidden * k + q * hidden  # q, k, v, o
        total += 3 * hidden * s["intermediate"]  # gate, up, down
    return 2 * total


def matmul_flops_per_token(config_or_model) -> int:
    """Matmul FLOPs of one token's forward: 2 x (in x out) summed over every linear layer incl. the LM head.

    The embedding is a lookup (no FLOPs); attention's score and value products, which grow with
    the context, are not counted.

    Args:
        config_or_model: a model (every ``nn.Linear`` counted from its actual shape, so per-layer sizes
            after structured pruning are exact) or a LLaMA-like ``PretrainedConfig`` (honours
            ``rayprune_layer_sizes``).
    """
    if isinstance(config_or_model, torch.nn.Module):
        return _linear_flops(config_or_model)
    return _config_flops(config_or_model)


def _vocab(model, tokenizer_or_vocab) -> int:
    vocab = model.config.vocab_size
    if isinstance(tokenizer_or_vocab, int):
        return min(tokenizer_or_vocab, vocab)
    if tokenizer_or_vocab is not None:
        return min(len(tokenizer_or_vocab), vocab)
    return vocab


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_run(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """One timed greedy generation on the KV cache.

    Args:
        model: causal LM.
        prompt: ``(B, P)`` token ids on the model's device.
        new_tokens: tokens to generate per sequence (the first comes from the prefill's logits).

    Returns:
        ``(prefill_seconds, decode_seconds, generated)`` with ``generated`` of shape ``(B, new_tokens)``;
        decode covers the ``new_tokens - 1`` one-token steps.
    """
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    t1 = time.perf_counter()
    cache, produced = out.past_key_values, [tok]
    for _ in range(new_tokens - 1):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        produced.append(tok)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(produced, dim=1)


def compare_speed(models: dict[str, torch.nn.Module], tokenizer_or_vocab=None, prompt_len: int = 512,
                  new_tokens: int = 128, batch_sizes: Sequence[int] = (1, 8), repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode speed of several models side by side (interleaved repeats, medians).

    Args:
        models: ``{name: model}``, all on the same device and sharing a vocabulary.
        tokenizer_or_vocab: a tokenizer or a vocabulary size bounding the random prompt ids
            (default: the first model's ``config.vocab_size``).
        prompt_len: prompt tokens per sequence.
        new_tokens: generated tokens per sequence (at least 2).
        batch_sizes: batch sizes to measure.
        repeats: timed runs per model and batch size.
        seed: seed of the prompt ids.

    Returns:
        ``{"prompt_len", "new_tokens", "repeats", "torch_threads", "device", "models": {name:
        {"flops_per_token", "batches": [{"batch_size", "prefill_tps", "decode_tps", "prefill_s",
        "decode_s", "generated_tokens", "prefill_tps_range", "decode_tps_range"}]}}}`` where tokens/s
        count all sequences of the batch (medians; the ranges are the slowest and fastest repeat),
        ``decode_tps`` counts the ``new_tokens - 1`` decode steps, and ``generated_tokens`` is the
        number of new tokens per sequence that the last run produced.

    Raises:
        UsageError: no models, ``new_tokens < 2``, or the lengths exceed a model's context.
    """
    if not models:
        raise UsageError("compare_speed: no models given")
    if new_tokens < 2 or prompt_len < 1 or repeats < 1 or not batch_sizes:
        raise UsageError("compare_speed: need new_tokens >= 2, prompt_len >= 1, repeats >= 1 and a batch size")
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    for name, m in models.items():
        max_pos = getattr(m.config, "max_position_embeddings", None)
        if max_pos is not None and prompt_len + new_tokens > max_pos:
            raise UsageError(f"compare_speed: prompt_len + new_tokens = {prompt_len + new_tokens} exceeds "
                             f"{name}'s maximum context of {max_pos}")
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, _vocab(first, tokenizer_or_vocab), (max(batch_sizes), prompt_len),
                            generator=gen).to(device)  # (Bmax, P)
    for m in models.values():  # warm-up: allocator, kernels, thread pools
        greedy_run(m, prompts[:1, : min(prompt_len, 16)], 2)
    pre: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in batch_sizes}
    dec: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in batch_sizes}
    counts: dict[tuple[str, int], int] = {}
    for r in range(repeats):
        for b in batch_sizes:
            for name, m in models.items():
                p_s, d_s, produced = greedy_run(m, prompts[:b], new_tokens)
                pre[name, b].append(p_s)
                dec[name, b].append(d_s)
                counts[name, b] = int(produced.shape[1])
        log.info("speed repeat %d/%d done", r + 1, repeats)
    out: dict = {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                 "torch_threads": torch.get_num_threads(), "device": str(device), "models": {}}
    for name, m in models.items():
        rows = []
        for b in batch_sizes:
            p_s, d_s = statistics.median(pre[name, b]), statistics.median(dec[name, b])
            p_tok, d_tok = b * prompt_len, b * (new_tokens - 1)
            rows.append({"batch_size": b, "prefill_tps": p_tok / p_s, "decode_tps": d_tok / d_s,
                         "prefill_s": p_s, "decode_s": d_s, "generated_tokens": counts[name, b],
                         # the spread over the repeats: [slowest, fastest] tokens/s
                         "prefill_tps_range": [p_tok / max(pre[name, b]), p_tok / min(pre[name, b])],
                         "decode_tps_range": [d_tok / max(dec[name, b]), d_tok / min(dec[name, b])]})
        out["models"][name] = {"flops_per_token": matmul_flops_per_token(m), "batches": rows}
    return out


def measure_speed(model, tokenizer_or_vocab=None, prompt_len: int = 512, new_tokens: int = 128,
                  batch_sizes: Sequence[int] = (1, 8), repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode speed of one model (see :func:`compare_speed` for the arguments).

    Returns:
        ``{"prompt_len", "new_tokens", "repeats", "torch_threads", "device", "flops_per_token", "batches"}``.
    """
    res = compare_speed({"model": model}, tokenizer_or_vocab, prompt_len, new_tokens, batch_sizes, repeats, seed)
    return {**{k: v for k, v in res.items() if k != "models"}, **res["models"]["model"]}
