"""SIGTERM (``ray job stop``, a deadline, an eviction) ends a CLI run cleanly: nothing is left but a distributed
run's checkpoint, and a scheduled ``--if-changed`` run continues that checkpoint instead of refusing every later
tick (issue 30, finding 7). The runs are held at a phase by a hold file (:mod:`orchestrator.testhooks`): the test
signals once the run has written that it arrived, never after a sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.testhooks import HOLD_DIR_ENV
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SCRIPT = "import sys; from orchestrator.surfaces.cli import main; sys.exit(main())"  # as the console script


def _held_run(tmp_path: Path, over: list[str], phase: str = "save") -> subprocess.Popen:
    """Start ``rayprune prune`` in a subprocess and return once it waits at the start of ``phase``.

    The run's ``.reached`` file is a FIFO: its write blocks until this side reads it (a rendezvous); a thread
    waiting for the process's exit fires the same event, so a run that dies first fails the test at once.
    """
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    (hold_dir / f"out.{phase}.hold").write_text("")
    reached = hold_dir / f"out.{phase}.reached"
    os.mkfifo(reached)
    env = {**os.environ, HOLD_DIR_ENV: str(hold_dir)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "-q", "prune", *over], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    event, arrived = threading.Event(), []
    threading.Thread(target=lambda: (arrived.append(reached.read_text()), event.set()), daemon=True).start()
    threading.Thread(target=lambda: (proc.wait(), event.set()), daemon=True).start()
    if not event.wait(timeout=540) or not arrived:  # the timeout only bounds a hang
        proc.kill()
        pytest.fail(f"the run never reached {phase}: {proc.communicate()[1][-3000:]}")
    return proc


def _terminate(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated (SIGTERM)" in err, err[-3000:]
    return err


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("hold", "calib.parquet"))


def test_sigterm_to_a_local_run_leaves_nothing(tmp_path, corpus_parquet):
    calib = tmp_path / "calib.parquet"
    calib.write_bytes(corpus_parquet.read_bytes())
    proc = _held_run(tmp_path, tiny_overrides(tmp_path / "out", calib))
    assert any(n.startswith(".out.tmp-") for n in _left(tmp_path))  # the run's temp directory, while it runs
    _terminate(proc)
    assert _left(tmp_path) == []  # no temp directory, no lock, no half-written run


def test_sigterm_to_a_ray_run_keeps_only_its_checkpoint_and_a_schedule_resumes_it(tmp_path, corpus_parquet):
    """Also the stdout contract on ``backend: ray`` (issue 31): the resuming console script prints exactly one
    stdout line, the JSON result, however much Ray's workers and the libraries print (all of it on stderr)."""
    pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    calib = tmp_path / "calib.parquet"
    calib.write_bytes(corpus_parquet.read_bytes())
    over = tiny_overrides(tmp_path / "out", calib, **{"backend.kind": "ray", "backend.workers": 2,
                                                      "backend.num_threads": 1, "pruning.method": "wanda"})
    _terminate(_held_run(tmp_path, over))
    assert _left(tmp_path) == [".out.ckpt"]
    progress = json.loads((tmp_path / ".out.ckpt" / "progress.json").read_text())
    assert progress["blocks_done"] == 2  # every block was pruned and committed before the signal
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "prune", "--if-changed", *over, "--json-out",
                           str(tmp_path / "r.json")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # before: refused until someone intervened
    assert "resuming the interrupted run" in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # worker and library output went to stderr
    result = json.loads(lines[0])
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["run_dir"] == str(tmp_path / "out") and result["reached_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "deepspeed" in proc.stderr.lower()  # the noise was there, elsewhere
    assert _left(tmp_path) == [".rayprune-index", "out", "r.json"]  # published, its key recorded; no checkpoint
