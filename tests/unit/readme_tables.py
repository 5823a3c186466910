"""What the README-table tests share: load a table script from tests/benchmarks and check the README's
block between its markers is the script's rendering of the JSON the block names."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def table_module(name: str) -> ModuleType:
    """``tests/benchmarks/<name>.py`` loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_readme_block_current(mod: ModuleType, what: str) -> None:
    """The README's block between ``mod.START`` and ``mod.END`` equals ``mod.render`` of the JSON it names."""
    text = (REPO / "README.md").read_text()
    marker = re.search(re.escape(mod.START) + r" (\S+) -->\n", text)
    assert marker, f"README has no {what} table markers"
    source = REPO / marker.group(1)
    assert source.is_file(), f"{source} named by the README's {what} table is missing"
    body = text[marker.end():text.index(mod.END)]
    assert body == mod.render(json.loads(source.read_text())), (
        f"README {what} table is stale: python tests/benchmarks/{mod.__name__}.py JSON --write README.md")
