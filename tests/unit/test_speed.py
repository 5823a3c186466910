"""Generation speed and FLOPs per token on the tiny LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.evaluation.speed import compare_speed, greedy_run, matmul_flops_per_token, measure_speed
from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(TinyModelConfig(**TINY))


def test_flops_match_hand_count(tiny):
    h, heads, kv, inter, layers, vocab = 64, 4, 2, 128, 2, 257
    hd = h // heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter  # q, k, v, o, gate/up/down
    expected = 2 * (layers * per_layer + h * vocab)
    assert expected == 180_352
    assert matmul_flops_per_token(tiny) == expected
    assert matmul_flops_per_token(tiny.config) == expected


def test_flops_count_per_layer_sizes(tiny):
    model = copy.deepcopy(tiny)
    mlp = model.model.layers[1].mlp  # shrink block 1's MLP to 32 channels, as structured pruning does
    mlp.gate_proj = torch.nn.Linear(64, 32, bias=False)
    mlp.up_proj = torch.nn.Linear(64, 32, bias=False)
    mlp.down_proj = torch.nn.Linear(32, 64, bias=False)
    removed = 2 * 3 * 64 * (128 - 32)
    assert matmul_flops_per_token(model) == 180_352 - removed
    cfg = copy.deepcopy(tiny.config)
    cfg.rayprune_layer_sizes = [{"kv_heads": 2, "intermediate": 128}, {"kv_heads": 2, "intermediate": 32}]
    assert matmul_flops_per_token(cfg) == 180_352 - removed


def test_greedy_run_matches_generate(tiny):
    prompt = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    _, _, produced = greedy_run(tiny, prompt, 6)
    ref = tiny.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None,
                        pad_token_id=256)
    assert produced.shape == (2, 6)
    assert torch.equal(produced, ref[:, 10:])


def test_measure_speed_keys_and_counts(tiny):
    res = measure_speed(tiny, byte_tokenizer(), prompt_len=32, new_tokens=8, batch_sizes=(1, 3), repeats=2)
    assert res["flops_per_token"] == 180_352
    assert [b["batch_size"] for b in res["batches"]] == [1, 3]
    for row in res["batches"]:
        assert row["generated_tokens"] == 8
        for key in ("prefill_tps", "decode_tps", "prefill_s", "decode_s"):
            assert row[key] > 0, key


def test_compare_speed_interleaves_models(tiny):
    res = compare_speed({"dense": tiny, "copy": copy.deepcopy(tiny)}, 257, prompt_len=16, new_tokens=4,
                        batch_sizes=(2,), repeats=1)
    assert set(res["models"]) == {"dense", "copy"}
    assert all(m["batches"][0]["generated_tokens"] == 4 for m in res["models"].values())


def test_speed_rejects_too_long_prompt(tiny):
    with pytest.raises(UsageError, match="maximum context of 256"):
        measure_speed(tiny, prompt_len=250, new_tokens=16, repeats=1)


def test_speed_verdicts_are_honest():
    """A difference inside the spread is 'no measurable difference'; unstructured runs say why there is none."""
    from orchestrator.outputs.report import _speed_lines, speed_verdict

    assert speed_verdict({"median": 100, "range": [90, 110]}, {"median": 105, "range": [95, 180]}) == \
        "no measurable difference"
    assert speed_verdict({"median": 100, "range": [90, 110]}, {"median": 150, "range": [140, 160]}) == "1.50x"
    assert speed_verdict({"median": 100, "range": [90, 110]}, {"median": 50, "range": [45, 60]}) == "0.50x"

    def row(p, d):
        return {"batch_size": 4, "prefill_tps": p[1], "decode_tps": d[1], "prefill_tps_range": [p[0], p[2]],
                "decode_tps_range": [d[0], d[2]]}

    speed = {"prompt_len": 8, "new_tokens": 4, "repeats": 2, "models": {
        "dense": {"batches": [row((90, 100, 110), (200, 286, 300))]},
        "pruned": {"batches": [row((95, 101, 108), (400, 516, 520))]}}}
    text = "\n".join(_speed_lines({"speed": speed, "structured": None}))
    assert "no speedup" in text and "(noise: shapes unchanged)" in text  # 1.8x decode on an unstructured model
    assert "| pruned | 4 | 101.0 (95.0-108.0) |" in text and "no measurable difference" in text
    text = "\n".join(_speed_lines({"speed": speed, "structured": {"removed_fraction": 0.5}}))
    assert "no speedup" not in text and "| 1.80x |" in text
