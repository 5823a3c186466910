"""``ray job submit -- rayprune prune ...`` against a head started with ``ray start --head`` on this machine.

The head runs with its own ``--temp-dir`` and free ports, so it neither becomes the
``ray_current_cluster`` other local Ray users auto-connect to nor collides with their
ports; it is stopped by signalling the process group this test started (``ray stop``
would stop every Ray instance on the machine). Token authentication is switched off
for the head and the clients with ``RAY_AUTH_MODE=disabled`` (Ray 2.60 turns it on when a
token file such as ``~/.ray/auth_token`` exists); deploy/README.md covers token mode.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port", "object-manager-port",
              "runtime-env-agent-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def head():
    """A 2-CPU Ray head with the dashboard (job submission), stopped in a finally."""
    if not RAY.exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    temp_dir = tempfile.mkdtemp(prefix="rp-head-", dir="/tmp")  # short: Ray puts unix sockets under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    log_path = Path(temp_dir) / "head.log"
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard=true",
           "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
           "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{dashboard}/api/version", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{ports['port']}", "env": env}
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the head (it stops its own Ray processes), then SIGKILL what is left of its process group (a
    graceful stop of every Ray process takes about 30 s; nothing of this throwaway cluster needs it)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def submit(head: dict, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    cmd = [str(RAY), "job", "submit", "--address", head["dashboard"], "--submission-id", submission_id,
           "--working-dir", str(REPO), "--", *entrypoint]
    return subprocess.run(cmd, env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=600)


def summary_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith('{"run_dir"')]
    assert lines, text[-3000:]
    return json.loads(lines[-1])


def test_ray_job_submit_runs_a_scheduled_prune_on_the_cluster(head, tmp_path):
    out = tmp_path / "runs" / "nightly-{key}"
    entry = ("rayprune", "prune", "--if-changed", "configs/tiny.yaml", f"output.dir={out}",
             "backend.kind=ray", "backend.address=auto", "backend.workers=2")
    first = submit(head, "rayprune-test-1", *entry)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    status = subprocess.run([str(RAY), "job", "status", "--address", head["dashboard"], "rayprune-test-1"],
                            env=head["env"], capture_output=True, text=True, timeout=120)
    assert "succeeded" in status.stdout + status.stderr
    logs = first.stdout + first.stderr
    assert "Connecting to existing Ray cluster" in logs and "phase prune: start" in logs
    summary = summary_line(logs)
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "runs" and run_dir.name == f"nightly-{summary['run_key'][:12]}"
    report = json.loads((run_dir / "report.json").read_text())
    assert abs(report["sparsity"]["reached"] - 0.5) < 1e-3 and summary["reached_sparsity"] == 0.5
    assert report["config"]["backend"]["kind"] == "ray" and len(report["memory_per_worker"]) == 2
    assert "prune.gradient_pass" in report["phases"]  # GBLM statistics really ran on the workers
    # the schedule's next tick (same inputs: the finished artifact, no statistics pass) is the same CLI code
    # in any driver: tests/integration/test_scheduled_runs.py runs it in process


def test_driver_outside_the_cluster_connects_by_address(head, tmp_path):
    out = tmp_path / "direct"
    cmd = [str(BIN / "rayprune"), "-q", "prune", "configs/tiny.yaml", f"output.dir={out}", "backend.kind=ray",
           f"backend.address={head['gcs']}", "backend.workers=2"]
    proc = subprocess.run(cmd, env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Connecting to existing Ray cluster at address:" in proc.stderr
    assert head["dashboard"] in proc.stderr  # our head, not a fresh local instance
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"]["reached"] - 0.5) < 1e-3 and len(report["memory_per_worker"]) == 2
