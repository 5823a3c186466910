"""Checkpoint commits: versioned files, committed by progress.json, superseded versions deleted afterwards."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from actors.checkpoint import CheckpointStore, grad_name, load_tensors, save_tensors
from actors.shard_writer import ShardWriter, write_block_files
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


def written_block(root, i: int) -> dict:
    """What the rank writing block ``i`` reports (:func:`actors.shard_writer.write_block_files`)."""
    return write_block_files(root, i, {f"layers.{i}.l.weight": torch.tensor([[0.0, float(i)]])},
                             {f"layers.{i}.l.weight": torch.tensor([[True, False]])})


def test_uncommitted_block_and_temp_files_are_ignored_and_cleaned(tmp_path):
    store = CheckpointStore(tmp_path, "fp")
    store.commit_block(0, written_block(tmp_path, 0), [{"name": "w"}])
    written_block(tmp_path, 1)  # written by a rank, never committed
    (tmp_path / "grad").mkdir()
    (tmp_path / "grad" / ".rank-00000-of-00002.step-000004.safetensors.tmpab").write_bytes(b"partial")
    (tmp_path / ".progress.json.tmpcd").write_bytes(b"{")

    reopened = CheckpointStore(tmp_path, "fp")
    assert reopened.blocks_done == 1
    path, sha = reopened.block_tensors(0)
    assert torch.equal(load_tensors(Path(path), sha)["layers.0.l.weight"], torch.tensor([[0.0, 0.0]]))
    assert reopened.block_rows(0) == [{"name": "w"}]
    assert sorted(reopened.clean()) == sorted(["model/model-block-00001.safetensors", ".progress.json.tmpcd",
                                               "masks/masks-block-00001.safetensors",
                                               "grad/.rank-00000-of-00002.step-000004.safetensors.tmpab",
                                               "records/block-00000.json", "records/block-00001.json"])
    assert sorted(reopened.shard_files()) == ["masks/masks-block-00000.safetensors",
                                              "model/model-block-00000.safetensors"]
    assert (tmp_path / "progress.json").is_file()


def test_blocks_commit_in_order_and_a_tampered_block_is_refused(tmp_path):
    store = CheckpointStore(tmp_path, "fp")
    with pytest.raises(ValueError, match="out of order"):
        store.commit_block(0, written_block(tmp_path, 1), [])
    store.commit_block(0, written_block(tmp_path, 0), [])
    path, sha = store.block_tensors(0)
    Path(path).write_bytes(Path(path).read_bytes()[:-1] + b" ")
    with pytest.raises(ValueError, match="SHA-256"):
        load_tensors(Path(path), sha)


def test_another_config_and_an_older_layout_are_refused(tmp_path):
    CheckpointStore(tmp_path, "fp").commit_grad(1, 1, [save_tensors(tmp_path / "g", parts(1, 0))], done=False)
    with pytest.raises(ValueError, match="another config"):
        CheckpointStore(tmp_path, "other")
    old = tmp_path / "old"
    old.mkdir()
    (old / "progress.json").write_text(json.dumps({"fingerprint": "fp", "files": {"grad/0": "ab" * 32}}))
    with pytest.raises(ValueError, match="older rayprune"):
        CheckpointStore(old, "fp")


def test_shard_writer_writes_behind_the_caller_and_hands_each_record_to_the_next_call(tmp_path, monkeypatch):
    from actors import shard_writer

    gate, started = threading.Event(), threading.Event()
    real = shard_writer.write_block_files

    def gated(*args):
        started.set()
        assert gate.wait(60), "the test never opened the gate"
        return real(*args)

    monkeypatch.setattr(shard_writer, "write_block_files", gated)
    writer = ShardWriter()
    t = {"b.0.w": torch.ones(2)}
    m = {"b.0.w": torch.tensor([True, False])}
    assert writer.submit(tmp_path, 0, t, m) is None  # returns while the write waits at the gate
    assert started.wait(60) and not (tmp_path / "model" / "model-block-00000.safetensors").exists()
    gate.set()
    record = writer.submit(tmp_path, 1, t, m)  # settles block 0 first and hands its record back
    assert record["index"] == 0 and set(record["files"]) == {"model/model-block-00000.safetensors",
                                                              "masks/masks-block-00000.safetensors"}
    entry = record["files"]["model/model-block-00000.safetensors"]
    assert entry["sha256"] == sha256_file(tmp_path / "model/model-block-00000.safetensors")
    assert entry["names"] == ["b.0.w"]
    assert writer.settle()["index"] == 1 and writer.settle() is None
    writer.close()


def test_shard_writer_raises_a_failed_write_at_the_next_call(tmp_path):
    (tmp_path / "model").write_text("a file where the folder should be")
    writer = ShardWriter()
    writer.submit(tmp_path, 0, {"w": torch.ones(1)}, {"w": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(OSError):
        writer.submit(tmp_path, 1, {"w": torch.ones(1)}, {"w": torch.ones(1, dtype=torch.bool)})
    writer.close()


@pytest.mark.parametrize("rel", ["../outside.safetensors", "/etc/passwd", "grad/../../x.safetensors",
                                 "config.yaml", "", "escape/g.safetensors"])
def test_a_tampered_progress_path_is_refused(tmp_path, rel):
    """``progress.json`` names the files a resume reads and moves into the run: each must stay below the
    checkpoint's data folders (issue 30, finding 9)."""
    store = CheckpointStore(tmp_path, "fp")
    store.commit_grad(1, 1, [save_tensors(tmp_path / grad_name(0, 1, 1), parts(1, 0))], done=False)
    progress = json.loads((tmp_path / "progress.json").read_text())
    (entry,) = progress["files"].values()
    entry["path"] = rel
    (tmp_path / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(ValueError, match="progress.json entry"):
        CheckpointStore(tmp_path, "fp")


def test_a_data_folder_linked_outside_the_checkpoint_is_refused(tmp_path):
    ckpt, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = CheckpointStore(ckpt, "fp")
    store.commit_grad(1, 1, [save_tensors(ckpt / grad_name(0, 1, 1), parts(1, 0))], done=False)
    for f in (ckpt / "grad").iterdir():
        f.rename(elsewhere / f.name)
    (ckpt / "grad").rmdir()
    (ckpt / "grad").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="leads outside"):
        CheckpointStore(ckpt, "fp")
    (ckpt / "grad").unlink()
    (ckpt / "grad").mkdir()
    for f in elsewhere.iterdir():
        f.rename(ckpt / "grad" / f.name)
    assert CheckpointStore(ckpt, "fp").resumed  # the same files inside: accepted
