"""The sharded checkpoint's pieces: bit-packed masks, flat-range reads, linear ownership, indexes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from orchestrator.engine.block_step import linear_owners
from orchestrator.outputs.assemble import sparsity_from_rows
from orchestrator.outputs.shards import (
    RangeReader,
    checkpoint_keys,
    load_masks,
    pack_bits,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(10,), (6, 7), (4, 3, 5)])
def test_range_reader_equals_slicing_the_flat_tensor(tmp_path, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=gen) * 10).to(dtype)
    other = torch.randn(3, generator=gen)  # another tensor before or after it in the file
    save_file({"a": other, "t": t, "z": other.clone()}, str(tmp_path / "x.safetensors"))
    n = t.numel()
    with RangeReader(tmp_path / "x.safetensors") as f:
        assert f.dtype("t") == dtype and f.numel("t") == n
        for lo, hi in [(0, n), (0, 1), (3, min(n, 11)), (n - 4, n), (5, 5)]:
            part = f.read_flat("t", lo, hi)
            assert part.dtype == dtype and torch.equal(part, t.reshape(-1)[lo:hi]), (lo, hi)
        assert torch.equal(f.read_flat("z", 0, 3), other)


def test_range_reader_refuses_what_is_not_safetensors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a safetensors file"):
        RangeReader(tmp_path / "x.safetensors")


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


def test_a_hub_id_is_resolved_once_to_a_local_snapshot_and_plan_fetches_configs_only(tmp_path, monkeypatch):
    """``materialize`` turns a hub id into one snapshot directory (one commit) that every rank reads; ``rayprune
    plan`` asks for the JSON files only. No hub is reachable here, so ``snapshot_download`` is replaced by one
    that records its calls and lays out a snapshot."""
    import huggingface_hub

    from orchestrator.errors import UsageError
    from orchestrator.inputs.config import ModelConfig
    from orchestrator.inputs.models import materialize

    calls = []

    def fake(repo, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo, revision, tuple(allow_patterns)))
        snap = tmp_path / "snapshots" / "0123abcd"
        snap.mkdir(parents=True, exist_ok=True)
        return str(snap)

    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    cfg = ModelConfig(source="org/model", revision="v1")
    assert materialize(cfg) == str(tmp_path / "snapshots" / "0123abcd")
    assert calls[0][:2] == ("org/model", "v1") and "*.safetensors" in calls[0][2] and "*.bin" not in calls[0][2]
    materialize(cfg, weights=False)
    assert calls[1][2] == ("*.json",)

    def offline(*_a, **_k):
        raise OSError("no route to the hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UsageError, match=r"^model\.source: cannot download 'org/model@v1' from the hub: OSError: "
                                         r"no route to the hub$"):
        materialize(cfg)
