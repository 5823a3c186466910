"""Storage every rank shares: checked before a distributed run loads anything.

Ranks write the pruned checkpoint and their statistic partitions into the run's checkpoint
directory, and a retry or ``--resume`` may place a rank on another node; so every node must see the
same directory. The driver writes a probe with a random token; every rank reads it and writes its
own; the driver reads every rank's. A rank that cannot see the driver's probe, or whose probe the
driver cannot see, names its node in the one-line refusal.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

#: test hook: a rank reads and writes the probe under this directory instead of the real one (a node
#: whose filesystem is not the driver's, simulated on one machine)
PRIVATE_ROOT_ENV = "RAYPRUNE_TEST_PRIVATE_STORAGE"
PROBES = ".probes"


def rank_view(path: Path) -> Path:
    """The path as this process sees it (itself, unless the test hook gives this node a private filesystem)."""
    private = os.environ.get(PRIVATE_ROOT_ENV)
    return Path(private) / path.relative_to(path.anchor) if private else path


def rank_probe(root: str, token: str, rank: int) -> dict:
    """A rank's half of the check: read the driver's probe, write its own. Never raises.

    Returns:
        ``{"rank", "node", "sees_driver", "wrote", "error"}``.
    """
    folder = rank_view(Path(root) / PROBES)
    out = {"rank": rank, "node": _node_name(), "sees_driver": False, "wrote": False, "error": None}
    try:
        out["sees_driver"] = (folder / "driver").read_text() == token
        (folder / f"rank-{rank}").write_text(token)
        out["wrote"] = True
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    return out


def _node_name() -> str:
    """This node as a person finds it: host name and Ray node id (several Ray nodes can share a host)."""
    try:
        import ray

        return f"{socket.gethostname()}/node {ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # noqa: BLE001 - outside Ray: the host name is all there is
        return socket.gethostname()


def driver_probe(root: Path) -> str:
    """Write the driver's probe under ``root`` (created); returns its token."""
    folder = root / PROBES
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    (folder / "driver").write_text(token)
    return token


def blind_ranks(root: Path, token: str, answers: list[dict]) -> list[dict]:
    """The ranks' answers whose probes show they do not share ``root`` with the driver (then the probes are removed)."""
    folder = root / PROBES
    bad = []
    for a in answers:
        p = folder / f"rank-{a['rank']}"
        seen = p.is_file() and p.read_text() == token
        if not (a["sees_driver"] and seen):
            bad.append(a)
    for p in folder.glob("*"):
        p.unlink(missing_ok=True)
    folder.rmdir()
    return bad
