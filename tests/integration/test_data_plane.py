"""No process holds the whole model: the coordinator handles metadata, the ranks move the tensors.

The coordinator of a ``backend: ray`` run never deserialises a weight-sized tensor and never loads the model;
each rank reads about its share of the checkpoint's bytes; the ranks score their own share of every block
and write the published checkpoint, which plain ``transformers`` loads and which evaluates as the one-process
run does.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from orchestrator.surfaces.cli import main  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402

pytestmark = pytest.mark.integration

#: wider than the suite's default tiny model, so a weight is clearly bigger than any metadata tensor
SHAPE = {"model.tiny.hidden": 64, "model.tiny.intermediate": 192, "model.tiny.layers": 3}
EVAL = {"eval.enabled": True, "eval.num_windows": 4, "eval.seq_len": 32, "eval.workers": 1}


@pytest.fixture
def unpickled(monkeypatch):
    """Element counts of every tensor unpickled in this (the driver's) process: what came back from actors."""
    import torch._utils as tu

    seen: list[int] = []
    real = tu._rebuild_tensor_v2

    def spy(storage, offset, size, stride, *args, **kwargs):
        t = real(storage, offset, size, stride, *args, **kwargs)
        seen.append(t.numel())
        return t

    monkeypatch.setattr(tu, "_rebuild_tensor_v2", spy)
    return seen


def _run(out, calib, eval_src, **extra) -> dict:
    args = tiny_overrides(out, calib, **{**SHAPE, **EVAL, "eval.source": str(eval_src), **extra})
    assert main(["-q", "prune", *args]) == 0
    return json.loads((out / "report.json").read_text())


def test_coordinator_holds_no_weight_and_the_ranks_write_a_loadable_checkpoint(
        ray_cluster, tmp_path, corpus_parquet, eval_parquet, unpickled, monkeypatch):
    from transformers import AutoModelForCausalLM

    from orchestrator import coordinator
    from orchestrator.outputs.shards import load_masks

    local = _run(tmp_path / "local", corpus_parquet, eval_parquet)  # the reference engine may hold the model
    unpickled.clear()

    def refuse(*_a, **_k):
        raise AssertionError("the coordinator of a distributed run loaded the model")

    monkeypatch.setattr(coordinator, "load_model", refuse)
    out = tmp_path / "ray"
    report = _run(out, corpus_parquet, eval_parquet, **{"backend.kind": "ray", "backend.workers": 2,
                                                         "backend.num_threads": 1})
    smallest = min(math.prod(r["shape"]) for r in report["layers"])
    assert max(unpickled, default=0) < smallest, f"a {max(unpickled)}-element tensor reached the driver"

    @ray_cluster.remote
    def a_weight() -> torch.Tensor:
        return torch.ones(smallest)

    assert ray_cluster.get(a_weight.remote()).numel() == smallest and max(unpickled) == smallest  # the spy works

    # each rank read its share of the checkpoint's tensors and nothing else: together, every byte exactly once
    files = sorted((out / "model").glob("model-block-*.safetensors"))
    assert len(files) == 3 and (out / "model" / "model-outside.safetensors").is_file()
    block = max(f.stat().st_size for f in files)
    mem = report["memory_per_worker"]
    for m in mem:
        share = m["load_tensor_bytes"] / 2
        assert 0 < m["load_read_bytes"] <= share + block, (m["load_read_bytes"], share, block)
    assert sum(m["load_read_bytes"] for m in mem) == mem[0]["load_tensor_bytes"] > 0

    # the published checkpoint: plain transformers loads it, its zeros are the masks, it evaluates as local does
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    masks = load_masks(out)
    params = dict(model.named_parameters())
    assert set(masks) == {r["name"] for r in report["layers"]}
    for name, mask in masks.items():
        assert bool((params[name].detach()[mask] == 0).all()), name
    assert abs(report["sparsity"]["reached"] - 0.5) < 0.01
    ppl, ref = report["metrics"]["pruned_ppl"], local["metrics"]["pruned_ppl"]
    assert abs(ppl - ref) / ref < 0.005, (ppl, ref)
    assert report["metrics"]["dense_ppl"] == pytest.approx(local["metrics"]["dense_ppl"], rel=1e-4)
    same = sum(int((masks[k] == v).sum()) for k, v in load_masks(tmp_path / "local").items())
    assert same / sum(v.numel() for v in masks.values()) >= 0.999
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"model/model.safetensors.index.json", "masks.safetensors.index.json"} <= set(manifest)
    assert not list(tmp_path.glob(".ray.ckpt"))  # the run's checkpoint is gone once it is published


def test_each_rank_scores_its_share_of_every_block(ray_cluster, tmp_path):
    """The report rows come from the rank that scored each linear: both ranks scored, every linear once,
    and the masks equal one process's (which is what rank-0 scoring gave)."""
    from actors.distributed import run_ray
    from orchestrator.engine.local import run_local
    from orchestrator.inputs.config import RunConfig
    from orchestrator.inputs.models import load_model, materialize

    cfg = RunConfig()
    cfg.model.source = "tiny"
    cfg.pruning.method = "sparsegpt"
    cfg.backend.kind = "ray"
    cfg.backend.num_threads = 1
    path = materialize(cfg.model)
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))  # (N, L)
    res = run_ray(cfg, path, ids, progress=False, shard_dir=tmp_path)
    local = run_local(load_model(path, cfg.model), ids, cfg.pruning, progress=False)
    scored = [m["scored_weights"] for m in res.memory]
    total = sum(m.numel() for m in local.masks.values())
    assert sum(scored) == total and min(scored) > 0, scored  # every weight scored once, on both ranks
    assert max(scored) <= 0.75 * total  # shared, not all on one rank
    same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
    assert same / total >= 0.999
    assert [r["name"] for r in res.outcome.layers] == [r["name"] for r in local.layers]  # the model's order


TWO_NODES = r"""
import json, sys, tempfile
from pathlib import Path
import torch, ray
from ray.cluster_utils import Cluster
from actors.distributed import run_ray
from actors.faults import Faults
from actors.group import GroupSpec
from actors.storage import PRIVATE_ROOT_ENV
from orchestrator.errors import RayPruneError, UsageError
from orchestrator.inputs.config import RunConfig

path, calib_file, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
calib = torch.load(calib_file, weights_only=True)
cfg = RunConfig()
cfg.model.source = "tiny"
cfg.pruning.method = "wanda"
cfg.backend.kind = "ray"
cfg.backend.max_retries = 0
cfg.output.dir = str(work / "run")
spec = GroupSpec(2, strategy="STRICT_SPREAD", num_threads=1, deepspeed=True)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
# the second node's processes see another filesystem under the run's directory (the test hook)
blind = cluster.add_node(num_cpus=1, env_vars={PRIVATE_ROOT_ENV: str(work / "elsewhere")})
ray.init(address=cluster.address, log_to_driver=False)
out = {}
try:
    try:
        run_ray(cfg, path, calib, progress=False, checkpoint_dir=work / "ckpt-blind", spec=spec)
        out["blind"] = "not refused"
    except UsageError as exc:
        out["blind"] = str(exc)
    out["blind_files"] = [str(p) for p in (work / "ckpt-blind").rglob("*") if p.is_file()]
    cluster.remove_node(blind)
    cluster.add_node(num_cpus=1)  # a node that shares the storage
    reference = run_ray(cfg, path, calib, progress=False, spec=spec)
    try:
        run_ray(cfg, path, calib, progress=False, checkpoint_dir=work / "ckpt", spec=spec,
                faults=Faults(kill_at_block=1))
        out["killed"] = "not failed"
    except RayPruneError as exc:
        out["killed"] = str(exc)
    out["blocks_done"] = json.loads((work / "ckpt" / "progress.json").read_text())["blocks_done"]
    resumed = run_ray(cfg, path, calib, progress=False, checkpoint_dir=work / "ckpt", spec=spec)
    out["same"] = sorted(reference.masks) == sorted(resumed.masks) and all(
        torch.equal(reference.masks[k], resumed.masks[k]) for k in reference.masks)
    out["same_weights"] = all(torch.equal(reference.weights[k], resumed.weights[k]) for k in reference.weights)
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_two_nodes_without_shared_storage_are_refused_and_a_killed_run_resumes(tmp_path):
    """Two in-process Ray nodes: one whose ranks see another filesystem is refused before loading, with one
    line naming ``output.dir`` and that node, nothing written; on shared storage a worker killed in the block
    pass, then a resumed run, gives the masks and weights of an uninterrupted one."""
    import subprocess
    import sys

    from orchestrator.inputs.config import ModelConfig
    from orchestrator.inputs.models import materialize

    path = materialize(ModelConfig(source="tiny"))
    calib_file = tmp_path / "calib.pt"
    torch.save(torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0)), calib_file)
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    proc = subprocess.run([sys.executable, str(script), path, str(calib_file), str(tmp_path)], capture_output=True,
                          text=True, timeout=500)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["blind"].startswith("output.dir: ") and "not storage every node shares" in out["blind"], out
    assert "\n" not in out["blind"] and out["blind"].count("(rank ") == 1, out  # the one blind node, named
    assert out["blind_files"] == []
    assert "checkpoints kept" in out["killed"] and out["blocks_done"] == 1, out
    assert out["same"] and out["same_weights"], out


def test_a_ray_sweep_is_written_by_the_ranks_and_evaluated_from_their_files(
        ray_cluster, tmp_path, corpus_parquet, eval_parquet, unpickled, monkeypatch):
    """Three sparsities on ray x2 in one pass: the coordinator loads no model and receives no weight; every
    candidate's checkpoint is written by the ranks and evaluated from the files; the numbers are the one-process
    sweep's. (The sequential sweep's files are checked against the local sweep in test_distributed.py.)"""
    from orchestrator import coordinator
    from orchestrator.outputs.shards import load_masks

    sweep = {"pruning.sweep": "[0.3, 0.5, 0.7]", "pruning.sequential": False, "eval.dense_baseline": False}
    local = _run(tmp_path / "local", corpus_parquet, eval_parquet, **sweep)
    unpickled.clear()
    monkeypatch.setattr(coordinator, "load_model", lambda *_a, **_k: pytest.fail("the coordinator loaded a model"))
    out = tmp_path / "ray"
    report = _run(out, corpus_parquet, eval_parquet, **sweep, **{"backend.kind": "ray", "backend.workers": 2,
                                                               "backend.num_threads": 1})
    smallest = min(math.prod(r["shape"]) for r in report["layers"])
    assert max(unpickled, default=0) < smallest
    assert report["sweep_passes"] == local["sweep_passes"]
    for row, ref in zip(report["sweep"], local["sweep"], strict=True):
        assert row["sparsity"] == ref["sparsity"] and row["reached"] == pytest.approx(ref["reached"], abs=1e-3)
        assert row["ppl"] == pytest.approx(ref["ppl"], rel=0.005), (row, ref)
        masks = load_masks(out / "sweep" / f"{row['sparsity']:.4f}")  # kept; the candidate's model/ is not
        frac = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert frac == pytest.approx(row["reached"], abs=1e-3)
        assert not (out / "sweep" / f"{row['sparsity']:.4f}" / "model").exists()
    assert report["metrics"]["pruned_ppl"] == pytest.approx(report["sweep"][1]["ppl"])
    assert (out / "model" / "model.safetensors.index.json").is_file()
    assert not (out / ".sweep-shards").exists()
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert all(not k.startswith(".sweep-shards") for k in manifest)
