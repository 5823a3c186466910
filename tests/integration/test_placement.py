"""Ranks, local ranks and devices follow what Ray assigned, on fake-GPU clusters (no NCCL started).

Ray accepts GPU resources a node does not have (``num_gpus=`` on a ``ray.cluster_utils.Cluster``
node), so the placement logic of :class:`actors.group.ActorGroup` runs for real on a CPU machine:
each actor reports the accelerator ids Ray gave it, and the group ranks them by node, then id.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from actors.group import ActorGroup, GroupMember, GroupSpec

layout = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2 * layout[0], "num_gpus": layout[0]})
for n in layout[1:]:
    cluster.add_node(num_cpus=2 * n, num_gpus=n)  # two CPUs per GPU, whatever this machine has
ray.init(address=cluster.address, log_to_driver=False)
try:
    group = ActorGroup(GroupMember, GroupSpec(sum(layout), use_gpu=True, backend=None, strategy="PACK"))
    infos = group.execute("device_info")
    group.shutdown()
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(infos))
"""


def _run(layout: list[int]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(layout)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _check(infos: list[dict], layout: list[int]) -> None:
    assert [i["rank"] for i in infos] == list(range(sum(layout)))
    assert all(i["world"] == sum(layout) and len(i["accelerator_ids"]) == 1 for i in infos)
    pairs = {(i["node_id"], i["accelerator_ids"][0]) for i in infos}
    assert len(pairs) == len(infos)  # no two ranks share a device
    nodes: list[str] = []
    for i in infos:  # ranks are grouped by node...
        if not nodes or nodes[-1] != i["node_id"]:
            assert i["node_id"] not in nodes
            nodes.append(i["node_id"])
    assert sorted(len([i for i in infos if i["node_id"] == n]) for n in nodes) == sorted(layout)
    for n in nodes:
        peers = [i for i in infos if i["node_id"] == n]
        ids = [int(p["accelerator_ids"][0]) for p in peers]
        assert ids == sorted(ids)  # ...then by accelerator id
        visible = ",".join(str(x) for x in ids)
        for local, p in enumerate(peers):
            assert p["local_rank"] == local
            assert p["visible_devices"] == visible  # the node's accelerators of this group, in order
            # the device index is the position of the actor's own accelerator among those it sees
            assert p["device_index"] == visible.split(",").index(p["accelerator_ids"][0]) == local
            assert p["device"] == "cpu"  # a CPU torch: nothing claims a CUDA device that does not exist
            assert p["threads"] == 2  # the node's CPUs as Ray declares them over its ranks, not the driver's cores


def test_one_node_with_four_gpus():
    _check(_run([4]), [4])


def test_two_nodes_with_two_gpus_each():
    _check(_run([2, 2]), [2, 2])
