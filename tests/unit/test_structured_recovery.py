"""LoRA recovery after structured pruning: schedules, batches, layout-independent gradients, merges."""

from __future__ import annotations

import copy
import math
import threading

import torch

from orchestrator.inputs.config import StructuredRecoveryConfig, TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama
from orchestrator.structured.recovery import apply_adapters, lr_factor, phases, step_batches, train

G = torch.Generator().manual_seed(0)
WINDOWS = torch.randint(0, 257, (6, 16), generator=G)  # (M, S)


def tiny(layers: int = 4):
    return build_tiny_llama(TinyModelConfig(layers=layers, hidden=32, heads=4, kv_heads=2, intermediate=48, seed=2))


def rcfg(**kw) -> StructuredRecoveryConfig:
    base = {"steps": 4, "batch_size": 4, "blocks_per_group": 2, "lr": 1e-2, "warmup": 0.0, "forward_dtype": "float32"}
    return StructuredRecoveryConfig(**{**base, **kw})


def test_phases_joint_and_sequential():
    assert phases(5, rcfg(steps=7, blocks_per_group=2)) == [([[0, 1], [2, 3], [4]], 7)]
    seq = phases(5, rcfg(steps=7, blocks_per_group=2, schedule="sequential"))
    assert seq == [([[0, 1]], 3), ([[2, 3]], 2), ([[4]], 2)]


def test_step_batches_are_epochs_of_permutations():
    b = step_batches(6, 5, 4, seed=3)  # 20 draws = 3 full epochs + 2
    assert b.shape == (5, 4)
    flat = b.reshape(-1)
    for e in range(3):
        assert sorted(flat[6 * e: 6 * e + 6].tolist()) == list(range(6))
    assert torch.equal(b, step_batches(6, 5, 4, seed=3))


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    f = [lr_factor(s, 20, 0.1) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert math.isclose(f[-1], 0.1)


def _lora_free(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_lowers_the_loss_and_merges_back():
    model = tiny()
    before = _lora_free(model)
    merged, adapters, rep = train(model, WINDOWS, rcfg(steps=12, dropout=0.0))
    losses = rep["phases"][0]["losses"]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.1
    after = _lora_free(merged)
    assert set(after) == set(before)  # plain model again: no lora parameters
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(any(p in n for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")) for n in changed)
    assert len(adapters) == 1 and adapters[0][0] == [0, 1, 2, 3]


def test_apply_adapters_replays_the_merges():
    for schedule in ("joint", "sequential"):
        model = tiny()
        fresh = copy.deepcopy(model)
        merged, adapters, _ = train(model, WINDOWS, rcfg(schedule=schedule))
        replay = apply_adapters(fresh, adapters, rcfg(schedule=schedule))
        for (n, a), (_, b) in zip(merged.named_parameters(), replay.named_parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


class ThreadSum:
    """A summing all-reduce between ``n`` threads (stands in for gloo)."""

    def __init__(self, n: int) -> None:
        self.barrier, self.lock, self.parts = threading.Barrier(n), threading.Lock(), []

    def __call__(self, t: torch.Tensor) -> None:
        with self.lock:
            self.parts.append(t.clone())
        self.barrier.wait()
        t.copy_(sum(self.parts))  # same list, same order on every thread
        if self.barrier.wait() == 0:
            self.parts.clear()
        self.barrier.wait()


def test_the_step_does_not_depend_on_how_windows_are_spread_over_workers():
    """Two in-process workers (threads, a summing all-reduce) equal one worker on the whole batch."""
    r = rcfg(steps=3, batch_size=3, dropout=0.0)  # odd batch: 2 + 1 windows; no dropout (global RNG, threads)
    single, _, rep1 = train(tiny(), WINDOWS, r)
    reduce, results, models = ThreadSum(2), {}, [tiny(), tiny()]  # built here: the global RNG is not per thread

    def worker(rank: int) -> None:
        results[rank] = train(models[rank], WINDOWS, r, rank=rank, world=2, all_reduce=reduce)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {0, 1}
    for rank in range(2):
        for (n, a), (_, b) in zip(single.named_parameters(), results[rank][0].named_parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
        losses = results[rank][2]["phases"][0]["losses"]
        assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(losses, rep1["phases"][0]["losses"], strict=True))
    # and the all-reduce matters: one worker alone on its share of the batch lands elsewhere
    alone, _, _ = train(tiny(), WINDOWS, r, rank=0, world=2, all_reduce=lambda t: None)
    diff = max((a - b).abs().max().item() for a, b in zip(single.parameters(), alone.parameters(), strict=True))
    assert diff > 1e-4
