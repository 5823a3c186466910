"""Checkpoint commits: versioned files, committed by progress.json, superseded versions deleted afterwards."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from actors.checkpoint import BlockWriter, CheckpointStore, grad_name, load_tensors, save_tensors
from orchestrator.fileio import sha256_file

WORLD = 2
KEY = "model.layers.0.mlp.up_proj.weight::sq"


def parts(step: int, rank: int) -> dict[str, torch.Tensor]:
    """What rank ``rank`` holds after ``step`` local sequences (distinct per step and rank)."""
    return {KEY: torch.full((3, 4), float(10 * step + rank))}


def save_ranks(store: CheckpointStore, step: int) -> list[str]:
    """Every rank writes its new version (what PruneWorker.save_gradients does); no commit."""
    return [save_tensors(store.grad_path(r, WORLD, step), parts(step, r)) for r in range(WORLD)]


def grad_dir_names(root) -> list[str]:
    return sorted(p.name for p in (root / "grad").iterdir())


def test_uncommitted_rank_files_leave_the_last_commit_loadable(tmp_path):
    store = CheckpointStore(tmp_path, "fp", "a: 1\n", {"sha256": "x"})
    store.commit_grad(WORLD, 4, save_ranks(store, 4), done=False)
    save_ranks(store, 5)  # the ranks wrote step 5; the driver died before committing it

    reopened = CheckpointStore(tmp_path, "fp")
    assert reopened.resumed and reopened.grad_steps == 4
    files = reopened.grad_files(WORLD)
    for r in range(WORLD):
        path, sha = files[r]
        assert path.endswith(grad_name(r, WORLD, 4)) and sha256_file(path) == sha
        loaded = load_tensors(path, sha)  # the hash matches: the uncommitted step 5 did not touch step 4's file
        assert torch.equal(loaded[KEY], parts(4, r)[KEY])
    assert reopened.clean() == [grad_name(r, WORLD, 5) for r in range(WORLD)]  # strays are removed
    assert grad_dir_names(tmp_path) == [grad_name(r, WORLD, 4).removeprefix("grad/") for r in range(WORLD)]


def test_commit_names_versioned_files_and_deletes_the_previous_version(tmp_path):
    store = CheckpointStore(tmp_path, "fp", "a: 1\n", {"sha256": "x"})
    store.commit_grad(WORLD, 4, save_ranks(store, 4), done=False)
    hashes = save_ranks(store, 8)
    assert len(grad_dir_names(tmp_path)) == 2 * WORLD  # both versions until the commit
    store.commit_grad(WORLD, 8, hashes, done=True)

    assert grad_dir_names(tmp_path) == [grad_name(r, WORLD, 8).removeprefix("grad/") for r in range(WORLD)]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["grad_steps"] == 8 and progress["grad_done"] and progress["inputs"] == {"sha256": "x"}
    for r in range(WORLD):
        entry = progress["files"][f"grad/{r}"]
        assert entry["path"] == f"grad/rank-{r:05d}-of-{WORLD:05d}.step-000008.safetensors"
        assert entry["sha256"] == hashes[r] == sha256_file(tmp_path / entry["path"])
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"


def test_committed_version_is_never_rewritten(tmp_path):
    store = CheckpointStore(tmp_path, "fp")
    store.commit_grad(WORLD, 4, save_ranks(store, 4), done=False)
    with pytest.raises(ValueError, match="committed"):
        store.grad_path(0, WORLD, 4)


def test_uncommitted_block_and_temp_files_are_ignored_and_cleaned(tmp_path):
    store = CheckpointStore(tmp_path, "fp")
    masks = {"w": torch.tensor([True, False])}
    store.save_block(0, masks, {"w": torch.tensor([1.0, 0.0])}, [{"name": "w"}])
    (tmp_path / "blocks" / "block-00001.safetensors").write_bytes(b"half a block")  # written, never committed
    (tmp_path / "grad").mkdir()
    (tmp_path / "grad" / ".rank-00000-of-00002.step-000004.safetensors.tmpab").write_bytes(b"partial")
    (tmp_path / ".progress.json.tmpcd").write_bytes(b"{")

    reopened = CheckpointStore(tmp_path, "fp")
    assert reopened.blocks_done == 1
    m, w, rows = reopened.load_block(0)
    assert torch.equal(m["w"], masks["w"]) and rows == [{"name": "w"}]
    assert sorted(reopened.clean()) == sorted(["blocks/block-00001.safetensors", ".progress.json.tmpcd",
                                               "grad/.rank-00000-of-00002.step-000004.safetensors.tmpab"])
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == ["block-00000.json", "block-00000.safetensors"]
    assert (tmp_path / "progress.json").is_file()


def test_another_config_and_an_older_layout_are_refused(tmp_path):
    CheckpointStore(tmp_path, "fp").commit_grad(1, 1, [save_tensors(tmp_path / "g", parts(1, 0))], done=False)
    with pytest.raises(ValueError, match="another config"):
        CheckpointStore(tmp_path, "other")
    old = tmp_path / "old"
    old.mkdir()
    (old / "progress.json").write_text(json.dumps({"fingerprint": "fp", "files": {"grad/0": "ab" * 32}}))
    with pytest.raises(ValueError, match="older rayprune"):
        CheckpointStore(old, "fp")


class GatedStore(CheckpointStore):
    """A store whose block saves wait for ``gate`` (set by the test), so a test sees a save still in flight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.started = threading.Event()

    def save_block(self, index, masks, weights, rows) -> None:
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        super().save_block(index, masks, weights, rows)


def block(i: int) -> tuple:
    return {"l": torch.tensor([[True, False]])}, {"l": torch.tensor([[0.0, float(i)]])}, [{"block": i}]


def test_block_writer_saves_behind_the_caller_in_order_and_settles_on_exit(tmp_path):
    store = GatedStore(tmp_path, "fp", "a: 1\n")
    with BlockWriter(store) as writer:
        writer.save(0, *block(0))  # returns while the save waits at the gate: the caller goes on
        assert store.started.wait(60) and store.blocks_done == 0
        store.gate.set()
        writer.save(1, *block(1))  # waits for block 0's commit first
        assert store.blocks_done >= 1
    assert store.blocks_done == 2
    masks, weights, rows = CheckpointStore(tmp_path, "fp").load_block(1)
    assert torch.equal(weights["l"], torch.tensor([[0.0, 1.0]])) and rows == [{"block": 1}]


def test_block_writer_raises_a_failed_save_and_settles_before_an_error_propagates(tmp_path):
    store = GatedStore(tmp_path, "fp", "a: 1\n")
    store.gate.set()
    writer = BlockWriter(store)
    writer.save(1, *block(1))  # out of order: the store refuses it on the writer's thread
    with pytest.raises(ValueError, match="out of order"):
        writer.save(0, *block(0))
    writer.__exit__(None, None, None)
    assert store.blocks_done == 0

    store.gate.clear()
    with pytest.raises(KeyError, match="driver"), BlockWriter(store) as writer:
        writer.save(0, *block(0))
        assert store.started.wait(60)
        store.gate.set()
        raise KeyError("driver")  # exiting waits for the queued save: a retry resumes from a settled store
    assert store.blocks_done == 1


def test_block_writer_without_a_store_saves_nothing(tmp_path):
    with BlockWriter(None) as writer:
        writer.save(0, *block(0))
    assert not any(tmp_path.iterdir())
