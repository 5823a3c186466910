"""Fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.keyed_inputs import write_calib, write_model_dir


@pytest.fixture
def calib(tmp_path) -> Path:
    """A small JSONL calibration file."""
    return write_calib(tmp_path)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A small model directory (config, safetensors, tokenizer)."""
    return write_model_dir(tmp_path)
