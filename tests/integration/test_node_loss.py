"""A node lost during the gradient pass (issue 30, finding 2): the retry waits for the workers to be placeable
again and resumes from the checkpoint with the masks of an uninterrupted run; when no node comes back within
``backend.capacity_wait_s`` the run fails with one line and keeps its checkpoint. A two-node
``ray.cluster_utils.Cluster`` (one CPU each: one rank per node) stands in for a cluster losing a pod."""

from __future__ import annotations

import json
import threading

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


def _add_node_once_a_group_waits(c) -> threading.Thread:
    """Add a one-CPU node as soon as the GCS shows a pending placement group (the retry waiting for room)."""
    from ray.util import placement_group_table

    def watch() -> None:
        while not any(i["state"] == "PENDING" for i in placement_group_table().values()):
            threading.Event().wait(0.05)  # GCS state, polled until the event it reports
        c.add_node(num_cpus=1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_lost_node_replaced_later_resumes_with_the_same_masks(cluster, tmp_path):
    c, cfg, path, calib, reference = cluster
    watcher: list[threading.Thread] = []
    faults = Faults(lose_node_after_grad_chunks=1,
                    lose_node=lambda group: (_remove_worker_node(c), watcher.append(_add_node_once_a_group_waits(c))))
    res = run_ray(cfg, path, calib, progress=False, checkpoint_dir=tmp_path / "ckpt", faults=faults)
    assert faults.fired == {"lose_node_after_grad_chunks"}
    watcher[0].join(timeout=60)
    assert not watcher[0].is_alive()  # the retry did wait for a node (before: a UsageError at once)
    _same_masks(res.masks, reference.masks)


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
