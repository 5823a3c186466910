"""Zero-shot multiple choice by log-likelihood, the way lm-eval-harness scores it.

An example is ``{"context": str, "choices": [str, ...], "label": int}``; each choice is a
*continuation* of the context, scored by the summed log-probability of its tokens given the
context. ``acc`` takes the argmax of the sums, ``acc_norm`` the argmax of the sums divided by
each choice's length in characters (lm-eval 0.4's ``acc_norm``). The continuation is the choice
string exactly as stored (put the separating space in the choice, e.g. ``" apt"``, or at the end of
the context: as in lm-eval, trailing whitespace of the context is moved into the continuation).

Tokenisation follows lm-eval's causal models: ``whole = encode(context + continuation)``,
``ctx = encode(context)``, continuation tokens ``= whole[len(ctx):]``; an empty context is
replaced by the BOS (or EOS) token. Scores are per example so that a split of the examples
across workers reduces exactly (:func:`aggregate` over the concatenated lists).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from orchestrator.errors import UsageError

TASKS_DIR = Path(__file__).with_name("tasks")  # builtin local tasks, e.g. debian_cloze.jsonl


@dataclass
class _Request:
    example: int
    choice: int
    ctx: list[int]
    cont: list[int]


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped in ``orchestrator/tasks`` (usable in place of a path)."""
    return sorted(f.stem for f in TASKS_DIR.glob("*.jsonl"))


def task_path(name_or_path: str | Path) -> Path:
    """The JSONL file of a builtin task name (``"debian_cloze"``) or of a path."""
    p = Path(name_or_path)
    if p.suffix == "" and len(p.parts) == 1 and (TASKS_DIR / f"{p}.jsonl").is_file():
        return TASKS_DIR / f"{p}.jsonl"
    return p


def load_task(path: str | Path) -> list[dict]:
    """Read and validate a local multiple-choice task (JSON Lines).

    Each non-blank line is an object with ``context`` (non-empty string), ``choices`` (list of
    at least two non-empty strings) and ``label`` (int index into ``choices``); other keys are kept.

    Args:
        path: a JSONL file, or the name of a builtin task (:func:`builtin_tasks`).

    Raises:
        UsageError: unreadable file, or a bad line (naming the file, the line number and the field).
    """
    p = task_path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"zero-shot task {str(p)!r} is not readable: {exc}") from None
    examples = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"zero-shot task {str(p)!r} line {no}"
        try:
            ex = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(ex, dict):
            raise UsageError(f"{where}: expected an object with context, choices, label; got {type(ex).__name__}")
        for key in ("context", "choices", "label"):
            if key not in ex:
                raise UsageError(f"{where}: missing field {key!r}")
        if not isinstance(ex["context"], str) or not ex["context"]:
            raise UsageError(f"{where}: field 'context' must be a non-empty string, got {ex['context']!r:.60}")
        ch = ex["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise UsageError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, "
                             f"got {ch!r:.80}")
        lab = ex["label"]
        if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(ch):
            raise UsageError(f"{where}: field 'label' must be an integer in [0, {len(ch) - 1}], got {lab!r}")
        examples.append(ex)
    if not examples:
        raise UsageError(f"zero-shot task {str(p)!r} has no examples")
    return examples


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval's causal models split them.

    Returns:
        ``(context_ids, continuation_ids)``; their concatenation is the tokenised whole string
        (or ``[bos_or_eos] + encode(continuation)`` for an empty context).
    """
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if cfg is not None and getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return 2048


def _batches(reqs: list[_Request], max_batch_tokens: int, max_batch_size: int, max_logits: int, vocab: int
             ) -> list[list[_Request]]:
    """Longest first (little padding); a batch holds at most ``max_batch_tokens`` padded tokens and
    ``max_logits`` kept logits (rows x positions from the earliest continuation on x vocabulary)."""
    order = sorted(reqs, key=lambda r: -(len(r.ctx) + len(r.cont)))
    out: list[list[_Request]] = []
    cur: list[_Request] = []
    width = first_start = 0
    for r in order:
        start = len(r.ctx) - 1
        if cur:
            rows, lo = len(cur) + 1, min(first_start, start)
            if (rows * width > max_batch_tokens or len(cur) >= max_batch_size
                    or rows * (width - lo) * vocab > max_logits):
                out.append(cur)
                cur = []
        if not cur:
            width, first_start = len(r.ctx) + len(r.cont) - 1, start
        first_start = min(first_start, start)
        cur.append(r)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def _score_batch(model, batch: list[_Request], max_length: int, pad_id: int, keep_ok: bool) -> list[float]:
    """Summed continuation log-probs of a batch (right padding, no mask needed: the model is causal)."""
    seqs, starts, ends = [], [], []
    for r in batch:
        full = (r.ctx + r.cont)[-(max_length + 1):]  # left-truncate as lm-eval does
        inp = full[:-1]
        seqs.append(inp)
        ends.append(len(inp))  # logits at positions [start, end) predict the continuation
        starts.append(len(inp) - len(r.cont))
    width = max(ends)
    device = next(model.parameters()).device
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lo = min(starts)
    kwargs = {"use_cache": False}
    if keep_ok:  # only project the positions that predict continuation tokens onto the vocabulary
        kwargs["logits_to_keep"] = torch.arange(lo, width, device=device)
    logits = model(ids.to(device), **kwargs).logits  # (B, K, V) with K = width - lo, or (B, T, V)
    offset = lo if keep_ok else 0
    out = []
    for i, r in enumerate(batch):
        cont = torch.tensor(r.cont, dtype=torch.long, device=device)  # (C,)
        rows = logits[i, starts[i] - offset: ends[i] - offset].float()  # (C, V)
        logp = torch.log_softmax(rows, dim=-1).gather(1, cont[:, None])[:, 0]  # (C,)
        out.append(float(logp.sum()))
    return out


@torch.no_grad()
def _score_shared_context(model, ctx: list[int], conts: list[list[int]], pad_id: int) -> list[float]:
    """Summed log-probs of several continuations of one context, running the context once (KV cache).

    The context's last logits predict each continuation's first token; the cache is repeated
    per choice and the continuations (minus their last token, right-padded) run on top of it.
    """
    device = next(model.parameters()).device
    out = model(torch.tensor([ctx], device=device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
    totals = [float(first[c[0]]) for c in conts]
    width = max(len(c) for c in conts) - 1
    if width == 0:
        return totals
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(conts))
    ids = torch.full((len(conts), width), pad_id, dtype=torch.long)  # (C, W)
    for i, c in enumerate(conts):
        ids[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
    logits = model(ids.to(device), past_key_values=cache, use_cache=True).logits  # (C, W, V)
    for i, c in enumerate(conts):
        if len(c) > 1:
            rows = torch.log_softmax(logits[i, : len(c) - 1].float(), dim=-1)  # (len-1, V)
            tgt = torch.tensor(c[1:], dtype=torch.long, device=device)
            totals[i] += float(rows.gather(1, tgt[:, None]).sum())
    return totals


def score_examples(model, tokenizer, examples: list[dict], progress: bool = False, reuse_context: bool = False,
                   max_batch_tokens: int = 4096, max_batch_size: int = 64, max_logits: int = 2**26
                   ) -> list[dict]:
    """Score multiple-choice examples by log-likelihood.

    Args:
        model: causal LM (eval mode); any device.
        tokenizer: its tokenizer (a ``PreTrainedTokenizer``).
        examples: ``{"context", "choices", "label"}`` dicts (see :func:`load_task`).
        progress: show a progress bar.
        reuse_context: run each example's context once and its choices on its KV cache (fewest
            FLOPs when contexts are long and choices short, but many small forwards); by default every
            ``context + choice`` is a row of a padded batch, longest first (as lm-eval does: large
            matmuls, the faster choice on GPUs and as fast on SmolLM2 on CPU for the local cloze
            task). Both give the same numbers up to float rounding
            (log-softmax in float32; lm-eval's runs in the model's dtype, so bf16 models may differ
            from lm-eval in the last digits).
        max_batch_tokens: padded tokens per forward in the batched mode (bounds memory).
        max_batch_size: sequences per forward in the batched mode.
        max_logits: logits kept per forward in the batched mode (2**26 floats: 256 MiB).

    Returns:
        One dict per example, in order: ``{"acc": 0|1, "acc_norm": 0|1, "loglik": [float per choice]}``.
    """
    reqs: list[_Request] = []
    for e, ex in enumerate(examples):
        for c, choice in enumerate(ex["choices"]):
            ctx, cont = encode_pair(tokenizer, ex["context"], choice)
            if not cont:
                raise UsageError(f"zero-shot example {e}: choice {c} ({choice!r}) tokenises to nothing")
            reqs.append(_Request(e, c, ctx, cont))
    max_len = _max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    lls: list[list[float]] = [[math.nan] * len(ex["choices"]) for ex in examples]
    by_example: dict[int, list[_Request]] = {}
    for r in reqs:
        by_example.setdefault(r.example, []).append(r)
    rest: list[_Request] = []
    if reuse_context and keep_ok:
        for e in tqdm(range(len(examples)), desc="zero-shot", disable=not progress, unit="ex"):
            group = by_example[e]
            if any(len(r.ctx) + len(r.cont) > max_len or r.ctx != group[0].ctx for r in group):
                rest += group  # left truncation (as lm-eval) or unshared contexts: the batched path
                continue
            for r, ll in zip(group, _score_shared_context(model, group[0].ctx, [r.cont for r in group], pad_id),
                             strict=True):
                lls[e][r.choice] = ll
    else:
        rest = reqs
    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    batches = _batches(rest, max_batch_tokens, max_batch_size, max_logits, vocab)
    for batch in tqdm(batches, desc="zero-shot", disable=not progress or not rest, unit="batch"):
        for r, ll in zip(batch, _score_batch(model, batch, max_len, pad_id, keep_ok), strict=True):
            lls[r.example][r.choice] = ll
    results = []
    for ex, ll in zip(examples, lls, strict=True):
        norm = [v / len(c) for v, c in zip(ll, ex["choices"], strict=True)]
        pred = max(range(len(ll)), key=ll.__getitem__)  # first maximum, like numpy.argmax
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        results.append({"acc": int(pred == ex["label"]), "acc_norm": int(pred_norm == ex["label"]), "loglik": ll})
    return results


def aggregate(results: list[dict]) -> dict:
    """Mean accuracies over per-example results (from one or several workers, concatenated).

    Returns:
        ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}``; the standard errors are
        the sample standard deviation (ddof 1) over sqrt(n), as lm-eval reports them.
    """
    n = len(results)
    out: dict = {"n": n}
    for key in ("acc", "acc_norm"):
        vals = [float(r[key]) for r in results]
        mean = sum(vals) / n if n else math.nan
        var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else math.nan
        out[key] = mean
        out[f"{key}_stderr"] = math.sqrt(var / n) if n > 1 else math.nan
    return out
