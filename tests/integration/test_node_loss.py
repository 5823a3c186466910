"""A node lost during the gradient pass (issue 30, finding 2): the retry waits for the workers to be placeable
again and resumes from the checkpoint with the masks of an uninterrupted run; when no node comes back within
``backend.capacity_wait_s`` the run fails with one line and keeps its checkpoint. A two-node
``ray.cluster_utils.Cluster`` (one CPU each: one rank per node) stands in for a cluster losing a pod."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.distributed import run_ray  # noqa: E402
from actors.faults import Faults  # noqa: E402
from orchestrator.errors import RayPruneError  # noqa: E402
from orchestrator.inputs.models import load_tokenizer, materialize  # noqa: E402
from tests.integration.test_faults import TEXT, _same_masks, make_cfg  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    cfg = make_cfg()
    path = materialize(cfg.model)
    ids = torch.tensor(load_tokenizer(path, cfg.model)(TEXT * 4)["input_ids"], dtype=torch.int64)
    calib = ids[: 6 * 32].reshape(6, 32)  # (6, 32): 3 sequences per rank, a commit after each
    reference = run_ray(cfg, path, calib, progress=False)
    yield c, cfg, path, calib, reference
    ray.shutdown()
    c.shutdown()


def _remove_worker_node(c) -> None:
    """Remove the non-head node (its rank dies with it, as with a preempted pod)."""
    (node,) = c.worker_nodes
    c.remove_node(node)


def test_a_lost_node_replaced_later_resumes_with_the_same_masks(cluster, tmp_path):
    """The run goes on in a thread; this (main) thread removes the node when the fault fires, then adds one
    once the retry's placement group is pending (``Cluster.add_node`` works in the main thread only)."""
    from ray.util import placement_group_table

    c, cfg, path, calib, reference = cluster
    lose, lost = threading.Event(), threading.Event()
    faults = Faults(lose_node_after_grad_chunks=1, lose_node=lambda group: (lose.set(), lost.wait(300)))
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = run_ray(cfg, path, calib, progress=False, checkpoint_dir=tmp_path / "ckpt", faults=faults)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert lose.wait(300), out
    _remove_worker_node(c)
    lost.set()
    deadline = time.monotonic() + 300  # a bound on a hang: the event is the retry's pending group in the GCS
    while not any(i["state"] == "PENDING" for i in placement_group_table().values()):
        assert time.monotonic() < deadline and worker.is_alive(), out
        threading.Event().wait(0.05)
    c.add_node(num_cpus=1)  # KubeRay replacing the pod
    worker.join(600)
    assert "error" not in out and faults.fired == {"lose_node_after_grad_chunks"}, out
    _same_masks(out["result"].masks, reference.masks)
    for name, w in reference.weights.items():  # the resumed statistics are the uninterrupted ones exactly
        assert torch.equal(out["result"].weights[name], w), name


def test_a_lost_node_never_replaced_fails_in_one_line_and_keeps_the_checkpoint(cluster, tmp_path):
    import dataclasses

    c, cfg, path, calib, _ = cluster
    cfg = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, capacity_wait_s=2.0))
    if len(c.worker_nodes) == 0:
        c.add_node(num_cpus=1)
    faults = Faults(lose_node_after_grad_chunks=1, lose_node=lambda group: _remove_worker_node(c))
    with pytest.raises(RayPruneError) as err:
        run_ray(cfg, path, calib, progress=False, checkpoint_dir=tmp_path / "ckpt", faults=faults)
    line = str(err.value)
    assert "could not be placed again within 2 s" in line and "--resume" in line and "\n" not in line, line
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert progress["grad_steps"] >= 1  # what the lost attempt committed is there for --resume
