"""Render the structured benchmark's JSON as the README's markdown table (and rewrite it in place).

Every row is compared with the Torch-Pruning peer row of the same target and the same recovery
(none, or LoRA with cross-entropy: the peer's recovery) from the same run, on perplexity; speedups
are against the dense model measured in the same run (recovered rows share their pruned twin's shapes
and so its speed). Variant names are those of ``structured_variants.py``.

Usage::

    python tests/benchmarks/structured_table.py tests/benchmarks/results/structured-2026-12-08.json --write README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

START = "<!-- structured table:"
END = "<!-- end of structured table -->"
PEER = "torch-pruning"
RECOVERY = {None: "none", "ce": "LoRA, cross-entropy", "kd": "LoRA, distillation"}


def _recovery(row: dict) -> str | None:
    return row.get("loss", "ce") if row["recovered"] else None


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def render(result: dict) -> str:
    """The markdown table of one structured benchmark JSON."""
    rows = result["rows"]
    peer = {(r["target"], _recovery(r)): r for r in rows if r["allocation"] == PEER}
    d = result["dense"]
    lines = [
        "| removed | row | recovery | decoder params | ppl@512 | vs Torch-Pruning | debian_cloze acc | "
        "prefill x dense | decode x dense |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| 0 | dense | - | {d['params'] / 1e6:.2f}M | {d['ppl']:.2f} | | {_cell(d.get('debian_cloze_acc'), '.3f')} "
        "| 1.00 | 1.00 |",
    ]
    order = {None: 0, "ce": 1, "kd": 2}
    for r in sorted(rows, key=lambda r: (r["target"], order[_recovery(r)], r["ppl"])):
        ref = peer.get((r["target"], _recovery(r)) if _recovery(r) != "kd" else (r["target"], "ce"))
        vs = "" if ref is None or ref is r else f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%"
        name = "Torch-Pruning (peer)" if r["allocation"] == PEER else f"**{r['allocation']}**"
        lines.append(f"| {r['target']:.0%} | {name} | {RECOVERY[_recovery(r)]} | {r['params'] / 1e6:.2f}M | "
                     f"{r['ppl']:.2f} | {vs} | {_cell(r.get('debian_cloze_acc'), '.3f')} | "
                     f"{_cell(r.get('prefill_speedup'), '.2f')} | {_cell(r.get('decode_speedup'), '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Print the table, or rewrite it in ``--write``'s file."""
    sys.path.insert(0, str(Path(__file__).parent))
    from quality_table import cli  # the README-block rewriting both tables share

    return cli(render, __doc__, "structured", START, END)


if __name__ == "__main__":
    raise SystemExit(main())
