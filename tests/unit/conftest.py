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


@pytest.fixture
def tiny_block_of():
    """``make(n)``: block 0 of a seeded tiny LLaMA, its ``(n, 16, H)`` inputs on ``n`` random sequences, its kwargs."""
    import torch

    from orchestrator.engine.blocks import capture_block_inputs, decoder_blocks
    from orchestrator.inputs.config import ModelConfig
    from orchestrator.inputs.models import load_model, materialize

    def make(n: int):
        cfg = ModelConfig(source="tiny")
        model = load_model(materialize(cfg), cfg)
        ids = torch.randint(0, model.config.vocab_size, (n, 16), generator=torch.Generator().manual_seed(0))
        hidden, kwargs = capture_block_inputs(model, ids)
        return decoder_blocks(model)[0], hidden, kwargs

    return make
