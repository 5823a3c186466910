"""Pure modules must not pull in Ray or DeepSpeed (DESIGN.md, layout rules)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("ray", "deepspeed")


@pytest.mark.parametrize(
    "modules",
    [("orchestrator.pruning", "orchestrator.inputs.config"), ("orchestrator.planner",)],
)
def test_pure_modules_do_not_import_ray_or_deepspeed(modules: tuple[str, ...]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps({'loaded': [m for m in " + repr(list(modules)) + " if m in sys.modules],"
        " 'heavy': sorted(k for k in sys.modules if k.split('.')[0] in " + repr(list(HEAVY)) + ")}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == list(modules)  # the imports really happened
    assert result["heavy"] == [], f"{modules} imported {result['heavy']}"


def test_planner_does_not_import_torch() -> None:
    code = "import sys, orchestrator.planner; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
