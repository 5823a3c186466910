"""The sharded checkpoint's pieces: bit-packed masks, flat-range slices, linear ownership, indexes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.engine.block_step import linear_owners
from orchestrator.outputs.assemble import sparsity_from_rows
from orchestrator.outputs.shards import (
    checkpoint_keys,
    load_masks,
    pack_bits,
    read_flat_range,
    unpack_bits,
    write_index,
    writer_rank,
)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 24), (5, 3, 7)])
def test_pack_bits_round_trips_and_is_an_eighth_of_bool(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_pack_bits_is_little_endian_within_a_byte():
    mask = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pack_bits(mask).tolist() == [1 + 128, 1]


@pytest.mark.parametrize("shape", [(10,), (6, 7), (4, 3, 5)])
def test_read_flat_range_equals_slicing_the_flat_tensor_and_reads_only_covering_rows(tmp_path, shape):
    t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    save_file({"t": t}, str(tmp_path / "x.safetensors"))
    n = t.numel()
    row = n // shape[0]
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for lo, hi in [(0, n), (0, 1), (3, min(n, 11)), (n - 4, n), (5, 5), (row, 2 * row)]:
            part, nbytes = read_flat_range(f, "t", lo, hi)
            assert torch.equal(part, t.reshape(-1)[lo:hi]), (lo, hi)
            if hi > lo and len(shape) > 1:
                rows = (hi - 1) // row - lo // row + 1
                assert nbytes == rows * row * 4  # the rows holding the range, nothing else
            elif hi > lo:
                assert nbytes == (hi - lo) * 4


def test_linear_owners_balance_by_size_and_cover_every_linear():
    sizes = {"q": 4, "k": 1, "v": 1, "o": 4, "gate": 12, "up": 12, "down": 12}
    owners = linear_owners(sizes, 2)
    assert list(owners) == list(sizes)  # the block's order
    load = [sum(s for n, s in sizes.items() if owners[n] == r) for r in range(2)]
    assert sorted(load) == [22, 24]  # the best split: two of the 12s always share a rank
    assert linear_owners(sizes, 1) == dict.fromkeys(sizes, 0)
    assert set(linear_owners(sizes, 8).values()) == set(range(7))  # more ranks than linears: one each
    assert linear_owners(sizes, 3) == linear_owners(dict(sizes), 3)  # deterministic


def test_greedy_owners_are_never_worse_than_twice_the_best_split():
    """Largest-first greedy (LPT) is within 4/3 of the optimal makespan; here against brute force."""
    import itertools

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = {f"l{i}": int(s) for i, s in enumerate(torch.randint(1, 50, (6,), generator=gen))}
        owners = linear_owners(sizes, 3)
        got = max(sum(s for n, s in sizes.items() if owners[n] == r) for r in range(3))
        best = min(max(sum(s for (n, s), r in zip(sizes.items(), a, strict=True) if r == k) for k in range(3))
                   for a in itertools.product(range(3), repeat=6))
        assert got <= best * 4 / 3 + 1e-9


def test_writer_ranks_spread_blocks_round_robin():
    assert [writer_rank(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_index_and_masks_of_both_layouts(tmp_path):
    a, b = torch.tensor([[True, False]]), torch.tensor([False, True, True])
    (tmp_path / "masks").mkdir()
    save_file({"x.0.w": a}, str(tmp_path / "masks" / "masks-block-00000.safetensors"))
    save_file({"x.1.w": b}, str(tmp_path / "masks" / "masks-block-00001.safetensors"))
    write_index(tmp_path / "masks.safetensors.index.json",
                {"x.1.w": "masks/masks-block-00001.safetensors", "x.0.w": "masks/masks-block-00000.safetensors"}, 5)
    body = json.loads((tmp_path / "masks.safetensors.index.json").read_text())
    assert list(body["weight_map"]) == ["x.0.w", "x.1.w"] and body["metadata"]["total_size"] == 5
    got = load_masks(tmp_path)
    assert torch.equal(got["x.0.w"], a) and torch.equal(got["x.1.w"], b)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"x.0.w": a}, str(single / "masks.safetensors"))
    assert torch.equal(load_masks(single)["x.0.w"], a)
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "nothing")


def test_checkpoint_keys_of_an_index_or_a_single_file(tmp_path):
    save_file({"a": torch.ones(1), "b": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_keys(tmp_path) == {"a": "model.safetensors", "b": "model.safetensors"}
    write_index(tmp_path / "model.safetensors.index.json", {"a": "one.safetensors"}, 4)
    assert checkpoint_keys(tmp_path) == {"a": "one.safetensors"}
    assert checkpoint_keys(tmp_path / "missing") is None


def test_sparsity_from_rows_counts_zeros_over_every_weight():
    rows = [{"name": "a", "shape": [2, 3], "zeros": 3}, {"name": "b", "shape": [4, 1], "zeros": 1}]
    assert sparsity_from_rows(rows) == (0.4, 4, 10)
