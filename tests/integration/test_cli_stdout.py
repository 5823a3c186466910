"""stdout is the result: ``rayprune prune`` on ``backend: ray`` prints exactly one line on stdout, the JSON
result, however much Ray's workers and the libraries print (it all goes to stderr)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_the_only_stdout_line_of_a_ray_run_is_its_json_result(tmp_path, corpus_parquet):
    over = tiny_overrides(tmp_path / "out", corpus_parquet, **{"backend.kind": "ray", "backend.workers": 2,
                                                               "pruning.method": "wanda"})
    code = "import sys; from orchestrator.surfaces.cli import main; sys.exit(main())"  # as the console script
    proc = subprocess.run([sys.executable, "-c", code, "prune", *over, "--json-out", str(tmp_path / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # worker and library output went to stderr
    result = json.loads(lines[0])
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["run_dir"] == str(tmp_path / "out") and result["reached_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "DeepSpeed" in proc.stderr or "deepspeed" in proc.stderr.lower()  # the noise was there, elsewhere
