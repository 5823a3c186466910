"""The GPU suite's CPU dry run: its rows drive the real engine (CPU actors on gloo), so the first lent GPU
meets rows that have run, not rows that were only written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

pytestmark = pytest.mark.integration


def test_rows_run_on_cpu_actors_and_report_where_tensors_lived(ray_cluster, tmp_path):
    from tests.gpu import check

    out = tmp_path / "dry.json"
    code = check.main(["--cpu", "--out", str(out), "--rows", "prune-wanda,stats-fp32", "--allow-skip", "stats-fp32"])
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 0, rows
    assert rows["prune-wanda"]["status"] == "passed" and rows["prune-wanda"]["masks_equal"] >= 0.999
    assert rows["prune-wanda"]["devices"] == {"parameters": ["cpu"], "statistics": [], "masks": ["cpu"]}
    assert rows["stats-fp32"]["status"] == "skipped"  # CUDA-only, allowed here
