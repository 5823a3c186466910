"""Test hooks that a deployment never triggers: a run waits at a phase while a hold file exists.

Tests synchronise on these events (a file the run writes on arrival, a file the test removes), never
on how long a phase takes. Without :data:`HOLD_DIR_ENV` in the environment nothing here does anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOLD_DIR_ENV = "RAYPRUNE_JOB_HOLD_DIR"


def hold_at_phase(output_dir: str, phase: str, before: Callable[[], Any] | None = None) -> None:
    """Hold a run at the start of ``phase`` while ``$RAYPRUNE_JOB_HOLD_DIR/NAME.PHASE.hold`` exists.

    ``NAME`` is the last part of the run's ``output.dir``. On arrival the run writes
    ``NAME.PHASE.reached``, so a test synchronises on that event (and on removing the hold file),
    never on how long a phase takes. ``before`` runs first (the job waits until the registry has
    recorded the phase). Without the variable (every deployment) this does nothing.
    """
    root = os.environ.get(HOLD_DIR_ENV)
    if not root or not output_dir:
        return
    hold = Path(root) / f"{Path(output_dir).name}.{phase}.hold"
    if not hold.exists():
        return
    if before is not None:
        before()
    hold.with_suffix(".reached").write_text(phase + "\n")
    while hold.exists():
        time.sleep(0.02)
