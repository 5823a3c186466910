"""Recovery by distillation: the top-k KL loss, its targets, and a falling loss on a tiny model."""

from __future__ import annotations

import pytest
import torch

from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import build_tiny_llama
from orchestrator.structured.distill import distill_loss, distill_targets
from orchestrator.structured.recovery import train, used_windows
from orchestrator.structured.run import run_structured


def test_with_every_token_kept_the_loss_is_the_full_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 30, generator=gen), torch.randn(7, 30, generator=gen)  # (S, V)
    for t in (1.0, 2.0):
        top = torch.topk(teacher, 30, dim=-1)
        got = distill_loss(student, top.values, top.indices, t)
        want = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                          log_target=True, reduction="batchmean") * t * t
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    top = torch.topk(student, 5, dim=-1)
    assert float(distill_loss(student, top.values, top.indices)) >= 0  # the student's own top-k: a small KL


def test_targets_cover_exactly_the_windows_the_steps_draw():
    model = build_tiny_llama(TinyModelConfig(layers=2, hidden=32, heads=2, kv_heads=1, intermediate=32, seed=0))
    windows = torch.randint(0, 257, (9, 12), generator=torch.Generator().manual_seed(1))  # (M, S)
    r = load_config(None, ["structured.recovery.steps=2", "structured.recovery.batch_size=2"]).structured.recovery
    used = used_windows(9, 2, r)  # (T, B)
    targets = distill_targets(model, windows, used, topk=4)
    assert targets.logits.shape == (torch.unique(used).numel(), 12, 4)
    w = int(used[0, 0])
    with torch.no_grad():
        want = torch.topk(model(windows[w][None]).logits[0], 4, dim=-1)
    torch.testing.assert_close(targets.of(w)[0], want.values)
    assert torch.equal(targets.of(w)[1], want.indices)
    unused = [i for i in range(9) if i not in set(used.reshape(-1).tolist())]
    if unused:
        with pytest.raises(KeyError):
            targets.of(unused[0])


def _cfg(loss: str, steps: int = 20):
    return load_config(None, [
        "structured.target=0.3", "structured.round_to=4", "structured.minibatches=2",
        "structured.recovery.enabled=true", "structured.recovery.source=calibration",
        f"structured.recovery.loss={loss}",
        f"structured.recovery.steps={steps}", "structured.recovery.batch_size=4", "structured.recovery.seq_len=16",
        "structured.recovery.lr=0.01", "structured.recovery.forward_dtype=float32", "structured.recovery.kd_topk=16",
        "structured.recovery.kd_temperature=0.1"])


def test_distillation_recovery_lowers_its_loss_on_a_tiny_model():
    """Every step takes the same 4 windows, so the step losses are comparable. A random tiny model's logits
    span a fraction of a nat and its final norm bounds them, so the loss is taken at a sharp temperature."""
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))  # 4 windows of 16
    model = build_tiny_llama(TinyModelConfig(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=64, seed=1))
    _, report = run_structured(_cfg("kd"), model, ids)
    losses = report["recovery"]["phases"][0]["losses"]
    assert report["recovery"]["loss"] == "kd"
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_training_refuses_a_mismatched_teacher():
    model = build_tiny_llama(TinyModelConfig(layers=2, hidden=32, heads=2, kv_heads=1, intermediate=32, seed=0))
    windows = torch.randint(0, 257, (4, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="needs distillation targets"):
        train(model, windows, _cfg("kd").structured.recovery)


def test_distillation_targets_are_bounded():
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match=r"structured.recovery.kd_topk: must be in \(0, 4096\], got 10000"):
        load_config(None, ["structured.recovery.kd_topk=10000"])
