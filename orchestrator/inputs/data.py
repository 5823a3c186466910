"""Calibration and evaluation token windows (BENCHMARK.md protocol).

Texts come from local parquet/jsonl/txt files or a hub dataset (through ``datasets``),
or the model writes its own calibration text (``source: generate``).
"""

from __future__ import annotations

import codecs
import logging
import random
from pathlib import Path

import torch

from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
#: text every Python installation carries (the standard library's ``pydoc_data.topics``: the language
#: reference topics), split by topic into two disjoint parts; the main job runs on them with no download
BUILTIN_PREFIX = "builtin:"
BUILTIN_SOURCES = ("builtin:python-topics-calibration", "builtin:python-topics-eval")


def _check_builtin(source: str, field: str) -> None:
    if source not in BUILTIN_SOURCES:
        raise UsageError(f"{field}: unknown builtin source {source!r} (builtin sources: {', '.join(BUILTIN_SOURCES)})")


def builtin_texts(source: str, field: str) -> list[str]:
    """The documents of a builtin source: every 3rd distinct ``pydoc_data`` topic text (by topic name) is
    evaluation text, the others calibration text, so the two never share a document.

    Raises:
        UsageError: an unknown builtin name.
    """
    _check_builtin(source, field)
    from pydoc_data.topics import topics

    first: dict[str, str] = {}  # some topics are aliases of one text: each text once, under its first name
    for name in sorted(topics):
        first.setdefault(topics[name], name)
    docs = sorted(first, key=first.__getitem__)
    held_out = source.endswith("-eval")
    return [t for i, t in enumerate(docs) if (i % 3 == 2) == held_out]
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
SNIFF_BYTES = 1 << 20


def check_text_file(path: Path, field: str) -> None:
    """Refuse a ``.txt``/``.jsonl`` file whose first MiB is not UTF-8 text (binary data, NUL bytes).

    Raises:
        UsageError: naming the field, the file and the first bad byte offset.
    """
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    bad = head.find(b"\x00")
    if bad < 0:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
        except UnicodeDecodeError as exc:
            bad = exc.start
    if bad >= 0:
        raise UsageError(f"{field}: {str(path)!r} is not UTF-8 text (binary data at byte {bad})")


def _innermost(exc: BaseException) -> BaseException:
    """The root cause of a chained exception (readers wrap the informative one)."""
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def check_source(source: str, field: str) -> None:
    """Fail early (before any model is loaded) on a builtin name that does not exist or a missing local file.

    Hub names are left to :func:`load_texts` (whether the hub answers is only known when asked).
    """
    if source.startswith(BUILTIN_PREFIX):
        _check_builtin(source, field)
        return
    path = Path(source).expanduser()
    if (path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))) and not path.exists():
        raise UsageError(f"{field}: file {source!r} does not exist")


def load_texts(source: str, text_column: str = "text", field: str = "calibration.source",
               hub_config: str | None = None, split: str = "train", revision: str | None = None) -> list[str]:
    """Read documents, in file order, from a local file/directory or a hub dataset.

    Args:
        source: path to a ``.parquet``/``.jsonl``/``.txt`` file (or a directory of them),
            a builtin source (:data:`BUILTIN_SOURCES`) or a hub dataset name.
        text_column: column holding the text (parquet/jsonl).
        field: config field named in error messages.
        hub_config: dataset config name for hub datasets.
        revision: commit or tag of a hub dataset (None: its default branch as it is now).
        split: split for hub datasets.

    Raises:
        UsageError: missing file, unreadable data, missing column, or no text at all.
    """
    if source.startswith(BUILTIN_PREFIX):
        return builtin_texts(source, field)
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
            if not files:
                raise UsageError(f"{field}: directory {source!r} holds no .parquet/.jsonl/.txt files")
            kinds = {LOCAL_SUFFIXES[p.suffix] for p in files}
            if len(kinds) > 1:
                raise UsageError(f"{field}: directory {source!r} mixes file types {sorted(kinds)}")
            for p in files:
                if p.suffix in TEXT_SUFFIXES:
                    check_text_file(p, field)
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        elif path.suffix in LOCAL_SUFFIXES or path.exists():
            if not path.is_file():
                raise UsageError(f"{field}: file {source!r} does not exist")
            kind = LOCAL_SUFFIXES.get(path.suffix)
            if kind is None:
                raise UsageError(f"{field}: {source!r} has unsupported suffix (use .parquet, .jsonl or .txt)")
            if path.stat().st_size == 0:
                raise UsageError(f"{field}: {source!r} contains no text (empty file)")
            if path.suffix in TEXT_SUFFIXES:
                check_text_file(path, field)
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif source.startswith((".", "/", "~")):
            raise UsageError(f"{field}: file {source!r} does not exist")
        else:
            ds = datasets.load_dataset(source, hub_config, split=split, revision=revision)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        root = _innermost(exc)
        lines = [ln for ln in str(root).splitlines() if ln.strip()]
        first = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
        raise UsageError(f"{field}: cannot read {source!r}: {first[:300]}") from None
    column = "text" if path.suffix == ".txt" else text_column
    if column not in ds.column_names:
        raise UsageError(f"{field}: {source!r} has no column {column!r} (columns: {ds.column_names})")
    texts = [t for t in ds[column] if isinstance(t, str)]
    if not texts and len(ds):
        feature = ds.features[column]
        raise UsageError(f"{field}: column {column!r} of {source!r} holds {getattr(feature, 'dtype', feature)}, "
                         "not text")
    if path.suffix == ".txt":
        texts = ["\n".join(texts)]
    if not any(t.strip() for t in texts):
        raise UsageError(f"{field}: {source!r} contains no text")
    return texts


def tokenize_corpus(texts: list[str], tokenizer) -> torch.Tensor:
    """Join documents with ``"\\n\\n"`` and tokenize once without special tokens -> ``(T,)`` int64."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def leading_special_tokens(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text by default (BOS for Llama 3 or Gemma; none for SmolLM2).

    Every window starts with them, as the model sees its inputs in use (and as lm-eval scores):
    they count inside the window length and, being first, are never a prediction target.
    """
    probe = "Hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    if not plain or plain[0] not in full:
        return []
    return list(full[: full.index(plain[0])])


def num_windows(tokens: torch.Tensor, seq_len: int, prefix: list[int] | tuple[int, ...] = ()) -> int:
    """Number of non-overlapping windows of ``seq_len`` tokens, each ``len(prefix)`` of them the prefix."""
    return tokens.numel() // (seq_len - len(prefix))


def _windows(tokens: torch.Tensor, seq_len: int, total: int, prefix: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``(total, seq_len)``: the first ``total`` corpus windows, each after ``prefix``."""
    body = seq_len - len(prefix)
    windows = tokens[: total * body].view(total, body)
    if not prefix:
        return windows
    head = torch.tensor(list(prefix), dtype=tokens.dtype).expand(total, len(prefix))
    return torch.cat([head, windows], dim=1)


def sample_windows(tokens: torch.Tensor, seq_len: int, n: int, seed: int, field: str,
                   prefix: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """Pick ``n`` windows with ``random.Random(seed).sample(range(num_windows), n)``.

    Args:
        prefix: ids every window starts with (:func:`leading_special_tokens`).

    Returns:
        ``(n, seq_len)`` int64, in sampling order (sample i is global position i).
    """
    total = num_windows(tokens, seq_len, prefix)
    if total < n:
        raise UsageError(
            f"{field}: corpus has {tokens.numel()} tokens = {total} windows of {seq_len}, fewer than {n} requested"
        )
    idx = random.Random(seed).sample(range(total), n)
    return _windows(tokens, seq_len, total, prefix)[idx].clone()


def first_windows(tokens: torch.Tensor, seq_len: int, n: int, field: str,
                  prefix: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """The first ``n`` non-overlapping windows, ``(n, seq_len)``, each starting with ``prefix``."""
    total = num_windows(tokens, seq_len, prefix)
    if total < n:
        raise UsageError(f"{field}: corpus has only {total} windows of {seq_len} tokens, {n} requested")
    return _windows(tokens, seq_len, n, prefix).clone()


@torch.no_grad()
def generate_windows(model, tokenizer, n: int, seq_len: int, seed: int, prompt: str = "",
                     temperature: float = 1.0, top_p: float = 0.95) -> torch.Tensor:
    """Self-generated calibration: the model samples ``n`` sequences of ``seq_len`` tokens.

    Each sequence starts from the prompt's tokens (or BOS/EOS when empty) and its own
    seed (``seed + i``), so the set does not depend on how it is batched.

    Returns:
        ``(n, seq_len)`` int64.
    """
    start = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not start:
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        start = [first if first is not None else 0]
    start = start[:seq_len]
    rows = []
    for i in range(n):
        torch.manual_seed(seed + i)
        ids = torch.tensor([start], dtype=torch.long)
        if ids.shape[1] < seq_len:
            ids = model.generate(
                ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                max_new_tokens=seq_len - ids.shape[1], min_new_tokens=seq_len - ids.shape[1],
                pad_token_id=tokenizer.eos_token_id,
            )
        rows.append(ids[0, :seq_len])
    return torch.stack(rows)


def calibration_windows(cfg, model_path: str, tokenizer, model=None) -> torch.Tensor:
    """Calibration windows for a run config, ``(num_samples, seq_len)`` int64.

    Args:
        cfg: the :class:`~orchestrator.inputs.config.RunConfig`.
        model_path: materialised model (loaded here when generating and ``model`` is None).
        tokenizer: the model's tokenizer.
        model: an already loaded model to generate with (optional).
    """
    c = cfg.calibration
    if model is not None:
        check_tokenizer(tokenizer, model)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and c.seq_len > max_pos:
        raise UsageError(f"calibration.seq_len: {c.seq_len} exceeds the model's maximum of {max_pos}")
    if c.source == "generate":
        if model is None:
            from orchestrator.inputs.models import load_model

            model = load_model(model_path, cfg.model)
            check_tokenizer(tokenizer, model)
        log.info("generating %d calibration sequences of %d tokens with the model itself", c.num_samples, c.seq_len)
        return generate_windows(model, tokenizer, c.num_samples, c.seq_len, c.seed,
                                c.generate.prompt, c.generate.temperature, c.generate.top_p)
    texts = load_texts(c.source, c.text_column, "calibration.source", c.hub_config, c.split, c.revision)
    tokens = tokenize_corpus(texts, tokenizer)
    check_vocab(tokens, model, "calibration.source")
    return sample_windows(tokens, c.seq_len, c.num_samples, c.seed, "calibration.source",
                          leading_special_tokens(tokenizer))


def model_vocab(model) -> int | None:
    """Token ids the model can embed: the smaller of ``config.vocab_size`` and the embedding's rows."""
    sizes = [getattr(getattr(model, "config", None), "vocab_size", None)]
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            sizes.append(getattr(get_emb(), "num_embeddings", None))
        except (NotImplementedError, AttributeError):
            pass
    sizes = [int(s) for s in sizes if isinstance(s, int) and s > 0]
    return min(sizes) if sizes else None


def check_tokenizer(tokenizer, model) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding cannot look up.

    Raises:
        UsageError: ``len(tokenizer)`` exceeds the model's vocabulary (checked before any forward).
    """
    vocab = model_vocab(model)
    size = len(tokenizer)
    if vocab is not None and size > vocab:
        raise UsageError(
            f"model.source: tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has {size} tokens "
            f"but the model's vocabulary has {vocab} entries "
            "(tokenizer/model vocabulary mismatch)"
        )


def check_vocab(tokens: torch.Tensor, model, field: str) -> None:
    """Refuse token ids the model's embedding cannot look up (tokenizer/model mismatch)."""
    vocab = model_vocab(model)
    if vocab is not None and tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab else int(tokens.min())
        raise UsageError(f"{field}: tokenizer produced id {bad} but the model's vocabulary has {vocab} entries")
