"""Publishing run directories (issue 9): atomic replace, crash recovery, one run per output dir, tags, umask."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.inputs.config import OutputConfig
from orchestrator.outputs import artifacts
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]

HOLD_LOCK = """
import sys
from orchestrator.outputs.artifacts import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes our stdin
"""

CRASH_IN_PUBLISH = """
import sys
from orchestrator.inputs.config import OutputConfig
from orchestrator.outputs import artifacts, publish
publish.exchange = lambda a, b: False  # the two-rename path, as on a filesystem without RENAME_EXCHANGE
with artifacts.RunWriter(OutputConfig(dir=sys.argv[1], overwrite=True)) as w:
    w.path("a.txt").write_text("new")
    w.publish()
"""


def _write_run(final: Path, text: str, overwrite: bool = False, **kw) -> Path:
    with artifacts.RunWriter(OutputConfig(dir=str(final), overwrite=overwrite), **kw) as w:
        w.path("a.txt").write_text(text)
        w.path("sub/b.txt").write_text(text * 2)
        return w.publish()


def _python(script: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env, text=True, **kw)


class _LockHolder:
    """A subprocess holding the output lock of ``final`` until :meth:`stop`."""

    def __init__(self, final: Path):
        self.proc = _python(HOLD_LOCK, str(final), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()  # blocks until the child holds the lock (or dies)
        assert line == "locked\n", f"lock holder failed to start (exit {self.proc.poll()})"

    def stop(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_replace_exchanges_atomically_and_removes_the_old_run(tmp_path, monkeypatch):
    from orchestrator.outputs import publish

    final = _write_run(tmp_path / "run", "old")
    swaps = []
    real_exchange = publish.exchange

    def exchange(a, b):
        done = real_exchange(a, b)
        swaps.append(done)
        if done:
            assert (b / "a.txt").read_text() == "new" and (a / "a.txt").read_text() == "old"
        return done

    real_rename = os.rename

    def rename(a, b):
        assert final not in (Path(a), Path(b)), "with an exchange the final path is never renamed away"
        real_rename(a, b)

    monkeypatch.setattr(publish, "exchange", exchange)
    with artifacts.RunWriter(OutputConfig(dir=str(final), overwrite=True)) as w:
        w.path("a.txt").write_text("new")
        monkeypatch.setattr(os, "rename", rename)
        w.publish()
    monkeypatch.undo()
    if swaps != [True]:
        pytest.skip("this filesystem cannot RENAME_EXCHANGE")
    assert (final / "a.txt").read_text() == "new"
    assert json.loads((final / "manifest.json").read_text())["files"].keys() == {"a.txt"}
    assert os.listdir(tmp_path) == ["run"]  # no old run, temp dir or lock file left


def test_replace_falls_back_to_renames_when_the_exchange_is_unsupported(tmp_path, monkeypatch):
    from orchestrator.outputs import publish

    final = _write_run(tmp_path / "run", "old")

    def einval(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(publish, "_RENAMEAT2", einval)
    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real_rename(a, b)))
    _write_run(final, "new", overwrite=True)
    assert (final / "a.txt").read_text() == "new"
    assert renamed[0][0] == "run" and re.fullmatch(r"\.run\.old-[0-9a-f]{32}", renamed[0][1]), renamed
    assert renamed[1][1] == "run" and len(renamed) == 2
    assert os.listdir(tmp_path) == ["run"]


def test_failed_second_rename_puts_the_old_run_back(tmp_path, monkeypatch):
    from orchestrator.outputs import publish

    final = _write_run(tmp_path / "run", "old")
    monkeypatch.setattr(publish, "exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".run.tmp-"):
            raise OSError(errno.EIO, "injected")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        _write_run(final, "new", overwrite=True)
    assert (final / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("reopen", ["check_output", "RunWriter"])
def test_crash_between_renames_leaves_a_run_or_restores_the_old_one(tmp_path, reopen, caplog):
    final = _write_run(tmp_path / "run", "old")
    proc = _python(CRASH_IN_PUBLISH, str(final), env={"RAYPRUNE_FAULT_PUBLISH": "between-renames"})
    assert proc.wait(timeout=120) == 1  # the fault hook ended it between the two renames
    left = sorted(os.listdir(tmp_path))
    olds = [n for n in left if n.startswith(".run.old-")]
    assert "run" not in left and len(olds) == 1, left
    assert re.fullmatch(r"\.run\.old-[0-9a-f]{32}", olds[0]) and olds[0] != f".run.old-{proc.pid}"

    caplog.set_level(logging.WARNING)
    if reopen == "check_output":
        assert artifacts.check_output(OutputConfig(dir=str(final), overwrite=True)) == final
    else:
        _write_run(final, "newer", overwrite=True)
    text = "newer" if reopen == "RunWriter" else "old"
    assert (final / "a.txt").read_text() == text and (final / "sub/b.txt").read_text() == text * 2
    assert "restored the previous run" in caplog.text
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".run.tmp-")] == ["run"]


def test_second_run_on_a_locked_output_dir_is_refused(tmp_path):
    final = tmp_path / "nested" / "run"
    holder = _LockHolder(final)
    try:
        lock = final.parent / ".run.lock"
        expected = f"output.dir: '{final}' is in use by another run (lock {lock})"
        with pytest.raises(UsageError) as err:
            artifacts.RunWriter(OutputConfig(dir=str(final)))
        assert str(err.value) == expected
        with pytest.raises(UsageError, match=re.escape(expected)), artifacts.output_lock(final):
            pass
        assert sorted(os.listdir(final.parent)) == [".run.lock"]  # the refused writer created nothing
    finally:
        holder.stop()
    _write_run(final, "mine")  # free again once the holder is gone
    assert sorted(os.listdir(final.parent)) == ["run"]


def test_run_prune_refuses_a_locked_output_dir_before_touching_its_checkpoints(tmp_path, corpus_parquet, capsys):
    from orchestrator.surfaces.cli import main

    final = tmp_path / "run"
    ckpt = tmp_path / ".run.ckpt"
    ckpt.mkdir()
    (ckpt / "layer0.safetensors").write_text("the other run's checkpoint")
    holder = _LockHolder(final)
    try:
        code = main(["-q", "prune", *tiny_overrides(final, corpus_parquet)])
        err = capsys.readouterr().err
    finally:
        holder.stop()
    assert code == 2 and f"output.dir: '{final}' is in use by another run (lock {tmp_path}/.run.lock)" in err, err
    assert (ckpt / "layer0.safetensors").read_text() == "the other run's checkpoint"
    assert sorted(os.listdir(tmp_path)) == [".run.ckpt"]


def test_lock_is_reentrant_in_its_thread_and_refused_in_another(tmp_path):
    final = tmp_path / "a" / "run"
    refused = []

    def other_thread():
        try:
            with artifacts.output_lock(final):
                refused.append(False)
        except UsageError as exc:
            refused.append("is in use by another run" in str(exc))

    with artifacts.output_lock(final) as held:
        assert held.path == tmp_path / "a" / ".run.lock" and held.created == [tmp_path / "a"]
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        with artifacts.RunWriter(OutputConfig(dir=str(final))) as w:  # run_prune holds it around its writer
            assert w.created == [tmp_path / "a"]
            w.path("a.txt").write_text("x")
            w.publish()
        assert (final.parent / ".run.lock").is_file()  # still held by the outer block
    assert refused == [True]
    assert sorted(os.listdir(final.parent)) == ["run"]


def test_failed_run_removes_the_lock_and_the_parents_it_created(tmp_path):
    final = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError), artifacts.RunWriter(OutputConfig(dir=str(final))) as w:
        assert w.created == [tmp_path / "new", tmp_path / "new" / "deeper"]
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_tag_names_the_temp_dir_exactly(tmp_path):
    final = tmp_path / "run"
    with artifacts.RunWriter(OutputConfig(dir=str(final)), tag="job-1f3a") as w:
        assert w.tmp == tmp_path / ".run.tmp-job-1f3a"
        w.path("a.txt").write_text("x")
        w.publish()
    assert sorted(os.listdir(tmp_path)) == ["run"]
    (tmp_path / ".other.tmp-job-2").mkdir()
    with pytest.raises(UsageError, match=r"temp directory '.*/\.other\.tmp-job-2' already exists"):
        artifacts.RunWriter(OutputConfig(dir=str(tmp_path / "other")), tag="job-2")
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-job-2", "run"]
    with pytest.raises(ValueError, match="not a plain name"):
        artifacts.RunWriter(OutputConfig(dir=str(tmp_path / "x")), tag="../escape")
    untagged = artifacts.RunWriter(OutputConfig(dir=str(tmp_path / "x")))
    assert re.fullmatch(r"\.x\.tmp-\w{8}", untagged.tmp.name)
    untagged.__exit__(RuntimeError, None, None)


def test_run_prune_passes_run_tag_to_its_writer(tmp_path, corpus_parquet):
    from orchestrator.coordinator import run_prune
    from orchestrator.inputs.loader import load_config

    final = tmp_path / "run"
    seen: list[list[str]] = []

    def hook(event, fields):
        if event == "phase_start" and fields["phase"] == "save":
            seen.append(sorted(os.listdir(tmp_path)))

    cfg = load_config(None, tiny_overrides(final, corpus_parquet, **{"pruning.method": "magnitude"}))
    assert run_prune(cfg, progress=False, on_event=hook, run_tag="job7") == final
    assert seen == [[".run.lock", ".run.tmp-job7"]]
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_umask_is_read_without_changing_it(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        def no_umask(*a):
            raise AssertionError("os.umask changes the umask of every thread")

        monkeypatch.setattr(os, "umask", no_umask)
        final = _write_run(tmp_path / "run", "x")
        from orchestrator.fileio import atomic_write_bytes, current_umask

        assert current_umask() == 0o027
        atomic_write_bytes(tmp_path / "f.bin", b"1")
        monkeypatch.undo()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)
    assert stat.S_IMODE(final.stat().st_mode) == 0o750
    assert stat.S_IMODE((final / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((final / "sub" / "b.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640


def test_publish_syncs_every_file_and_directory_and_the_parent(tmp_path, monkeypatch):
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = _write_run(tmp_path / "run", "x")
    paths = [tmp_path, final, *final.rglob("*")]
    missing = [str(p) for p in paths if (p.stat().st_dev, p.stat().st_ino) not in synced]
    assert not missing and len(paths) == 6


def test_a_structured_run_is_described_by_its_recipe_and_removed_parameters():
    from orchestrator.inputs.loader import load_config
    from orchestrator.outputs.model_card import render
    from orchestrator.outputs.report import structured_recipe

    cfg = load_config(None, ["structured.enabled=true", "structured.modules=mlp", "structured.allocation=uniform",
                             "structured.compensate=true", "structured.selection=reconstruction",
                             "structured.recovery.enabled=true", "structured.recovery.loss=kd"]).to_dict()
    assert structured_recipe(cfg["structured"]) == ("uniform allocation, MLP channels only, compensated, groups "
                                                    "chosen by reconstruction, LoRA recovery by distillation")
    report = {"config": cfg, "structured": {"parameters_before": 1000, "parameters_after": 800},
              "sparsity": {"reached": 0.0, "target": 0.2}, "calibration": {"samples": 4, "seq_len": 8},
              "metrics": {}}
    card = render(report, "rayprune prune x.yaml")
    assert "200 of its 1,000 parameters removed (20.00%)" in card and "linear weights are zero" not in card
    assert "MLP channels only, compensated" in card
