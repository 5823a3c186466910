"""Render the quality benchmark's JSON as the README's markdown table (and rewrite it in place).

Every rayprune row is compared with llm-compressor's SparseGPT row of the same pattern and
sparsity from the same run (the peer the targets name) on perplexity (and with ALPS's, where the run has
ALPS rows), and with our own plain
SparseGPT row of the same pattern and sparsity on pruning time; peer rows are marked.

Usage::

    python tests/benchmarks/quality_table.py tests/benchmarks/results/quality-2026-12-01.json --write README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START = "<!-- quality table:"
END = "<!-- end of quality table -->"
PEER = "llmc-"
ALPS = "alps"


def _key(row: dict) -> tuple[str, float]:
    return row["pattern"], round(float(row.get("options", {}).get("sparsity", 0.5)), 4)


def _options(row: dict) -> str:
    opts = {k: v for k, v in row.get("options", {}).items() if k != "sparsity"}
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"


def render(result: dict) -> str:
    """The markdown table of one benchmark JSON."""
    rows = [r for r in result["rows"] if "skipped" not in r]
    peer = {_key(r): r for r in rows if r["method"] == f"{PEER}sparsegpt" and _options(r) == "-"}
    alps = {_key(r): r for r in rows if r["method"] == ALPS}
    ours = {_key(r): r for r in rows if r["method"] == "sparsegpt" and _options(r) == "-"}
    vs_alps = bool(alps)  # the ALPS column only where the run has ALPS rows
    lines = [
        "| method | pattern | sparsity | options | ppl@512 | vs llm-compressor SparseGPT |"
        + (" vs ALPS |" if vs_alps else "") + " debian_cloze acc | prune s | x our SparseGPT's time |",
        "|---|---|---|---|---|---|" + ("---|" if vs_alps else "") + "---|---|---|",
        f"| dense | - | 0 | - | {result['dense_ppl']:.2f} | |" + (" |" if vs_alps else "")
        + f" {result['dense_debian_cloze_acc']:.3f} | | |",
    ]
    for r in sorted(rows, key=lambda r: (_key(r), r["ppl"])):
        base = ours.get(_key(r))
        times = "" if base is None else f"{r['prune_s'] / base['prune_s']:.2f}"
        if r["method"].startswith(PEER):
            name = f"llm-compressor {r['method'][len(PEER):]}"
        else:
            name = "ALPS (peer)" if r["method"] == ALPS else f"**{r['method']}**"
        pattern, sparsity = _key(r)
        vs = _relative(r, peer.get(_key(r))) + (f" {_relative(r, alps.get(_key(r)))}" if vs_alps else "")
        lines.append(f"| {name} | {pattern} | {sparsity:g} | {_options(r)} | {r['ppl']:.2f} | {vs} "
                     f"{r['debian_cloze_acc']:.3f} | {r['prune_s']:.0f} | {times} |")
    return "\n".join(lines) + "\n"


def _relative(row: dict, ref: dict | None) -> str:
    """``row``'s perplexity relative to ``ref``'s as ``+x.x% |`` (empty for no reference or the reference itself)."""
    return ("" if ref is None or ref is row else f"{100 * (row['ppl'] / ref['ppl'] - 1):+.1f}%") + " |"


def replace_block(text: str, table: str, source: str, start_marker: str = START, end_marker: str = END) -> str:
    """``text`` with the block between the markers replaced by ``table`` (the start marker names ``source``)."""
    start = text.index(start_marker)
    body = text.index("\n", start) + 1
    end = text.index(end_marker)
    return text[:start] + f"{start_marker} {source} -->\n" + table + text[end:] if body <= end else text


def cli(render_fn, doc: str, what: str, start_marker: str = START, end_marker: str = END) -> int:
    """Print ``render_fn``'s table of a benchmark JSON, or rewrite it between the markers of ``--write``'s file."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help=f"{what} benchmark JSON")
    ap.add_argument("--write", help="markdown file with the table's markers to rewrite")
    args = ap.parse_args()
    table = render_fn(json.loads(Path(args.json).read_text()))
    if args.write:
        path = Path(args.write)
        path.write_text(replace_block(path.read_text(), table, args.json, start_marker, end_marker))
    else:
        sys.stdout.write(table)
    return 0


def main() -> int:
    """Print the table, or rewrite it in ``--write``'s file."""
    return cli(render, __doc__, "quality")


if __name__ == "__main__":
    raise SystemExit(main())
