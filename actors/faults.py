"""Fault injection for the distributed engine's tests: kill or hang a worker at a chosen step (once)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

#: test hook: ``Faults.exit_after_grad_save`` for runs started without ``faults`` (e.g. through the CLI)
FAULT_EXIT_ENV = "RAYPRUNE_FAULT_EXIT_AFTER_GRAD_SAVE"


@dataclass
class Faults:
    """Fault injection for tests: each fault fires once, on the first attempt that reaches it.

    Attributes:
        kill_after_grad_chunks: ``ray.kill`` the last worker after this many gradient-pass calls.
        kill_at_block: ``ray.kill`` the last worker just before pruning this block.
        hang_at_block: make the last worker stop participating (sleep) when this block starts.
        hang_seconds: how long the hung worker sleeps.
        exit_after_grad_save: the last worker ends its process (``os._exit``) right after writing its
            partitions for this many local sequences, before the driver commits them.
        lose_node_after_grad_chunks: call ``lose_node`` after this many gradient-pass calls (a test removes the
            last worker's node from a ``ray.cluster_utils.Cluster`` there).
        lose_node: the test's action for ``lose_node_after_grad_chunks`` (driver side; gets the group).
    """

    kill_after_grad_chunks: int | None = None
    kill_at_block: int | None = None
    hang_at_block: int | None = None
    hang_seconds: float = 120.0
    exit_after_grad_save: int | None = None
    lose_node_after_grad_chunks: int | None = None
    lose_node: Callable[[object], None] | None = None
    fired: set = field(default_factory=set)

    @classmethod
    def from_env(cls) -> Faults | None:
        """The faults ``$RAYPRUNE_FAULT_EXIT_AFTER_GRAD_SAVE`` asks for (tests), or None when it is unset."""
        steps = os.environ.get(FAULT_EXIT_ENV)
        return cls(exit_after_grad_save=int(steps)) if steps else None

    def take(self, what: str, at: int) -> bool:
        """Whether fault ``what`` fires at step ``at`` (once)."""
        if getattr(self, what) == at and what not in self.fired:
            self.fired.add(what)
            return True
        return False
