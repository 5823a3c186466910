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
