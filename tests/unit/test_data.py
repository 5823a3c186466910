"""Text sources and tokenisation per the protocol."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.inputs.data import first_windows, load_texts, tokenize_corpus
from orchestrator.inputs.models import byte_tokenizer


def test_jsonl_txt_and_directory_sources(tmp_path):
    docs = ["first document", "second one", "third"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    assert load_texts(str(tmp_path / "a.jsonl")) == docs
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    assert load_texts(str(tmp_path / "b.txt")) == ["line one\nline two"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "2.jsonl").write_text(json.dumps({"body": "late"}) + "\n")
    (folder / "1.jsonl").write_text(json.dumps({"body": "early"}) + "\n")
    assert load_texts(str(folder), text_column="body") == ["early", "late"]


def test_corpus_is_joined_with_blank_lines_and_cut_into_windows():
    tok = byte_tokenizer()
    tokens = tokenize_corpus(["ab", "cd"], tok)
    assert tok.decode(tokens.tolist()) == "ab\n\ncd"
    assert tokens.numel() == 6
    w = first_windows(torch.arange(10), 4, 2, "eval.source")
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UsageError, match="only 2 windows"):
        first_windows(torch.arange(10), 4, 3, "eval.source")


def test_mixed_directory_and_unsupported_suffix_are_refused(tmp_path):
    (tmp_path / "x.txt").write_text("a")
    (tmp_path / "y.jsonl").write_text(json.dumps({"text": "b"}) + "\n")
    with pytest.raises(UsageError, match="mixes file types"):
        load_texts(str(tmp_path))
    (tmp_path / "z.csv").write_text("text\nhello\n")
    with pytest.raises(UsageError, match="unsupported suffix"):
        load_texts(str(tmp_path / "z.csv"))


def test_the_default_job_needs_no_file_outside_the_repository():
    """configs/default.yaml reads builtin text only: disjoint calibration and evaluation documents,
    enough of both for its window counts, and nothing under ../shared."""
    from pathlib import Path

    from orchestrator.inputs.data import BUILTIN_SOURCES, check_source, load_texts
    from orchestrator.inputs.loader import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    assert cfg.calibration.source in BUILTIN_SOURCES and cfg.eval.source in BUILTIN_SOURCES
    calib = load_texts(cfg.calibration.source, field="calibration.source")
    held_out = load_texts(cfg.eval.source, field="eval.source")
    assert not set(calib) & set(held_out)
    # SmolLM2's tokenizer averages ~4 characters a token on this text (166 and 54 windows of 512 tokens)
    assert sum(map(len, calib)) >= 1.25 * 4 * cfg.calibration.num_samples * cfg.calibration.seq_len
    assert sum(map(len, held_out)) >= 1.25 * 4 * cfg.eval.num_windows * cfg.eval.seq_len
    for source, field in ((cfg.calibration.source, "calibration.source"), (cfg.eval.source, "eval.source")):
        check_source(source, field)


def test_sources_are_checked_before_anything_loads(tmp_path):
    import pytest

    from orchestrator.errors import UsageError
    from orchestrator.inputs.data import check_source

    with pytest.raises(UsageError, match=r"^calibration\.source: unknown builtin source 'builtin:nope'"):
        check_source("builtin:nope", "calibration.source")
    with pytest.raises(UsageError, match=r"^eval\.source: file .*missing\.parquet' does not exist$"):
        check_source(str(tmp_path / "missing.parquet"), "eval.source")
    check_source("allenai/c4", "calibration.source")  # a hub name: decided when it is read


def _bos_tokenizer():
    """A byte tokenizer that, like Llama 3's or Gemma's, puts BOS (id 256) before every text."""
    from tokenizers import processors

    from orchestrator.inputs.models import byte_tokenizer

    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", 256)])
    return tok


def test_windows_start_with_the_tokens_the_tokenizer_adds():
    from orchestrator.inputs.data import first_windows, leading_special_tokens, sample_windows, tokenize_corpus
    from orchestrator.inputs.models import byte_tokenizer

    tok = _bos_tokenizer()
    plain = tok("ab", add_special_tokens=False)["input_ids"]
    assert tok("ab")["input_ids"] == [256, *plain] and len(plain) == 2  # the tokenizer really adds BOS
    assert leading_special_tokens(tok) == [256]
    assert leading_special_tokens(byte_tokenizer()) == []  # SmolLM2-like: nothing added
    text = "".join(chr(97 + i % 26) for i in range(100))
    tokens = tokenize_corpus([text], tok)  # (100,) corpus ids, no special tokens
    assert tokens.numel() == 100 and 256 not in tokens.tolist()
    first = first_windows(tokens, 10, 3, "eval.source", [256])
    assert first.shape == (3, 10)
    assert first[:, 0].tolist() == [256, 256, 256]  # BOS counted inside the window length...
    assert first[:, 1:].reshape(-1).tolist() == tokens[:27].tolist()  # ...and the corpus continues after it
    sampled = sample_windows(tokens, 10, 5, 0, "calibration.source", [256])
    assert sampled.shape == (5, 10) and (sampled[:, 0] == 256).all()
    bare = sample_windows(tokens, 10, 5, 0, "calibration.source")  # without a prefix: the protocol as before
    assert bare.shape == (5, 10) and 256 not in bare.reshape(-1).tolist()


def test_perplexity_never_scores_the_bos_position():
    """The first token of a window is never a target: only positions 1..L-1 are predicted."""
    import torch

    from orchestrator.evaluation.perplexity import window_nll
    from orchestrator.inputs.config import TinyModelConfig
    from orchestrator.inputs.models import build_tiny_llama

    model = build_tiny_llama(TinyModelConfig(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, seed=0))
    windows = torch.tensor([[256, 1, 2, 3, 4, 5]])
    _, tokens = window_nll(model, windows)
    assert tokens == 5
