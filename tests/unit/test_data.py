"""Text sources and tokenisation per the protocol."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.data import first_windows, load_texts, tokenize_corpus
from orchestrator.errors import UsageError
from orchestrator.modeling import byte_tokenizer


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
