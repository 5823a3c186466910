"""Block-level reconstruction (``reconstruct: block``): it lowers the block's output error, keeps the mask,
and its minibatches make a sharded run take the steps of one process."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from orchestrator.engine.block_step import StepContext, block_step
from orchestrator.engine.block_tune import epoch_steps, tune_block
from orchestrator.engine.blocks import block_linears, forward_all
from orchestrator.engine.device import Placement
from orchestrator.inputs.config import PruningConfig


@pytest.fixture
def tiny_block(tiny_block_of):
    """Block 0 of a seeded tiny LLaMA with its inputs on 8 random sequences."""
    return tiny_block_of(8)


def _cfg(reconstruct: str, epochs: int = 4) -> PruningConfig:
    cfg = PruningConfig(method="wanda", reconstruct=reconstruct, sequential=False)
    cfg.lstsq.solver = "exact"
    cfg.block_tune.epochs, cfg.block_tune.batch, cfg.block_tune.lr = epochs, 2, 1e-3
    return cfg


def _block_error(block, dense, hidden, kwargs) -> float:
    return float((forward_all(block, hidden, kwargs, Placement()) - dense).pow(2).mean())


def test_block_tuning_lowers_the_block_error_and_keeps_the_mask(tiny_block):
    block, hidden, kwargs = tiny_block
    dense_out = forward_all(block, hidden, kwargs, Placement())
    others = {n: p.detach().clone() for n, p in block.named_parameters() if not n.endswith("proj.weight")}
    layer_block, tuned_block = copy.deepcopy(block), copy.deepcopy(block)
    layer = block_step(layer_block, hidden, kwargs, StepContext(_cfg("layer"))).results[0]
    tuned = block_step(tuned_block, hidden, kwargs, StepContext(_cfg("block"))).results[0]
    for name, lin in block_linears(tuned_block).items():
        assert torch.equal(tuned[name].mask, layer[name].mask), name  # the method's mask, unchanged
        assert bool((lin.weight[tuned[name].mask] == 0).all()), name  # pruned weights stay zero
        torch.testing.assert_close(tuned[name].weight, lin.weight.detach())  # the result holds the tuned weight
        assert not torch.equal(lin.weight, block_linears(layer_block)[name].weight), name  # kept weights moved
    for name, p in tuned_block.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name  # only the pruned linears are tuned
    layer_err = _block_error(layer_block, dense_out, hidden, kwargs)
    tuned_err = _block_error(tuned_block, dense_out, hidden, kwargs)
    assert tuned_err < 0.9 * layer_err, (tuned_err, layer_err)


def test_epoch_steps():
    assert epoch_steps(32, 4) == 8
    assert epoch_steps(5, 4) == 2
    assert epoch_steps(1, 4) == 1


class _ThreadReduce:
    """A SUM all-reduce between threads (one per simulated rank), summed in rank order on every rank."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            t.copy_(total)

        return reduce


def _masked(block, hidden, kwargs):
    block_step(block, hidden, kwargs, StepContext(_cfg("layer")))
    return {n: lin.weight.data == 0 for n, lin in block_linears(block).items()}


@pytest.mark.parametrize("shards", [[(0, 4), (4, 8)], [(0, 3), (3, 8)]], ids=["even", "uneven"])
def test_two_ranks_take_the_steps_of_one_process(tiny_block, shards):
    """Each rank tunes on its own sequences with the gradients summed: the weights match one process's."""
    block, hidden, kwargs = tiny_block
    dense_out = forward_all(block, hidden, kwargs, Placement())
    masks = _masked(block, hidden, kwargs)
    ref = copy.deepcopy(block)
    tune_block(ref, block_linears(ref), masks, hidden, dense_out, kwargs, Placement(), 2, 2, 1e-3)
    ranks = [copy.deepcopy(block) for _ in shards]
    fake = _ThreadReduce(len(shards))
    errors: list[BaseException] = []

    def work(r: int) -> None:
        lo, hi = shards[r]
        try:
            tune_block(ranks[r], block_linears(ranks[r]), masks, hidden[lo:hi], dense_out[lo:hi], kwargs,
                       Placement(), 2, 2, 1e-3, positions=list(range(lo, hi)), reduce=fake.for_rank(r))
        except BaseException as e:  # surfaced below: a failing rank must fail the test
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    tuned = block_linears(ref)
    for r in ranks:
        for name, lin in block_linears(r).items():
            assert not torch.equal(tuned[name].weight, block_linears(block)[name].weight)
            torch.testing.assert_close(lin.weight, tuned[name].weight, rtol=1e-4, atol=1e-6)
