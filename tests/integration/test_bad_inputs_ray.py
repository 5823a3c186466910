"""Bad input that needs a Ray cluster: more workers than the cluster can place (issue 7).

The check must come before a placement group is requested (one that can never be placed
would wait), must exit 2 with one line naming ``backend.workers``, and leave nothing behind.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.distributed import start_workers  # noqa: E402
from actors.group import GroupSpec  # noqa: E402
from orchestrator.errors import UsageError  # noqa: E402
from orchestrator.surfaces.cli import main  # noqa: E402
from tests.conftest import TINY, tiny_overrides  # noqa: E402
from tests.unit.test_cli_errors import _listing  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cpus(ray_cluster):
    return int(ray_cluster.cluster_resources().get("CPU", 0))


def _placement_groups() -> int:
    return sum(1 for pg in ray.util.placement_group_table().values() if pg.get("state") != "REMOVED")


def test_more_workers_than_cpus_fails_fast_through_the_cli(cpus, tmp_path, corpus_parquet, capsys):
    asked = cpus + 1
    before, pgs = _listing(tmp_path), _placement_groups()
    code = main(["-q", "prune", *tiny_overrides(tmp_path / "out", corpus_parquet, **{
        "backend.kind": "ray", "backend.workers": asked, "pruning.method": "wanda"})])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("rayprune: error:")]
    assert code == 2, err
    assert lines == [f"rayprune: error: backend.workers: {asked} workers asked but the Ray cluster has {cpus} CPUs"]
    assert _placement_groups() == pgs  # never requested one (so never waited for one)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("workers", [0, -1])
def test_worker_group_needs_at_least_one_worker(cpus, workers):
    pgs = _placement_groups()
    with pytest.raises(UsageError, match=rf"^backend\.workers: must be >= 1, got {workers}$"):
        start_workers(GroupSpec(workers, deepspeed=True))
    assert _placement_groups() == pgs


def test_unreachable_cluster_address_fails_fast(tmp_path, corpus_parquet):
    """A Ray address nobody answers is one line naming backend.address within seconds, not a retry loop."""
    import subprocess
    import sys

    out = tmp_path / "run"
    args = tiny_overrides(out, corpus_parquet, **{"backend.kind": "ray", "backend.address": "127.0.0.1:1"})
    proc = subprocess.run([sys.executable, "-m", "orchestrator.surfaces.cli", "-q", "prune", *args],
                          capture_output=True, text=True, timeout=300)  # a retry loop would run past it
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rayprune: error:")]
    assert len(errors) == 1 and "backend.address" in errors[0] and "127.0.0.1:1" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_a_plan_that_cannot_fit_is_refused_before_anything_is_loaded(cpus, tmp_path, corpus_parquet, capsys,
                                                                       monkeypatch):
    """A tiny model of Llama-3-70B's size on two CPU workers: exit 2 with the plan's numbers, in the time the
    check takes; no model built (the seeded model's cache folder stays absent), no placement group, no file."""
    from orchestrator.inputs.config import TinyModelConfig
    from orchestrator.inputs.models import _tiny_key

    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    big = {"hidden": 8192, "layers": 80, "intermediate": 28672, "heads": 64, "kv_heads": 8}
    before, pgs = _listing(tmp_path), _placement_groups()
    over = tiny_overrides(tmp_path / "out", corpus_parquet, **{"backend.kind": "ray", "backend.workers": 2},
                          **{f"model.tiny.{k}": v for k, v in big.items()})
    code = main(["-q", "prune", *over])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("rayprune: error:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("rayprune: error: backend.workers: 2 workers: the plan needs "), err
    assert "GiB per worker" in lines[0] and "model.dtype=bfloat16" in lines[0] and "plan_check=false" in lines[0]
    tiny = TinyModelConfig(**{**TINY, **big})
    assert not (tmp_path / "cache" / "models" / f"tiny-{_tiny_key(tiny)}").exists()
    assert _placement_groups() == pgs
    assert _listing(tmp_path) == before


def test_a_run_configured_to_wait_for_gpus_fails_instead_of_falling_back_to_cpus(cpus):
    """``backend.gpu_wait_s``: a cluster without the GPUs is waited for (bounded) and then refused, never
    silently given CPU actors; with no wait the cluster is taken as it is (here: CPUs)."""
    from actors.cluster import wait_for_gpus

    assert wait_for_gpus(2, 0.0) is False
    with pytest.raises(UsageError, match=r"^backend\.gpu_wait_s: waited 0\.2 s for 2 GPUs but the Ray cluster "
                                         r"has 0$"):
        wait_for_gpus(2, 0.2)
