"""Render a run's ``report.json`` as the Markdown page a person reads first."""

from __future__ import annotations

import re
from collections import defaultdict


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def render_markdown(report: dict) -> str:
    """Markdown summary: config, metrics against dense, per-block sparsity, phase timings."""
    cfg = report["config"]
    pr, met, sp = cfg["pruning"], report["metrics"], report["sparsity"]
    lines = [
        f"# rayprune run: {pr['method']} {pr['pattern']} on {cfg['model']['source']}",
        "",
        f"- model: `{report['model']['path']}` ({report['model']['architecture']}, "
        f"{report['model']['parameters']:,} parameters)",
        f"- calibration: {report['calibration']['samples']} x {report['calibration']['seq_len']} tokens "
        f"from `{cfg['calibration']['source']}` (seed {cfg['calibration']['seed']})",
        f"- backend: {cfg['backend']['kind']}"
        + (f" with {cfg['backend']['workers']} workers" if cfg["backend"]["kind"] == "ray" else ""),
        f"- sparsity: target {sp['target']:.4f}, reached {sp['reached']:.4f} "
        f"({sp['zeros']:,} of {sp['pruned_weights_total']:,} pruned-layer weights are zero)",
        "",
        "## Metrics",
        "",
    ]
    if "pruned_ppl" in met or "dense_ppl" in met:
        ctx = met.get("eval_seq_len")
        lines += [
            f"| model | perplexity (context {ctx}, {met.get('eval_windows')} windows) |",
            "|---|---|",
        ]
        if "dense_ppl" in met:
            lines.append(f"| dense | {met['dense_ppl']:.3f} |")
        if "pruned_ppl" in met:
            lines.append(f"| pruned | {met['pruned_ppl']:.3f} |")
    else:
        lines.append("No evaluation was run (set `eval.source`).")
    lines += ["", "## Sparsity per block", "", "| block | weights | mean sparsity |", "|---|---|---|"]
    per_block: dict[int, list[float]] = defaultdict(list)
    for row in report["layers"]:
        m = re.search(r"\.(\d+)\.", row["name"])
        per_block[int(m.group(1)) if m else -1].append(row["sparsity"])
    for block in sorted(per_block):
        vals = per_block[block]
        lines.append(f"| {block} | {len(vals)} | {sum(vals) / len(vals):.4f} |")
    lines += ["", "## Phases", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["phases"].items()]
    if report.get("memory_per_worker"):
        lines += ["", "## Memory per worker", "", "| worker | peak RSS (MiB) | model state (MiB) |", "|---|---|---|"]
        for i, m in enumerate(report["memory_per_worker"]):
            lines.append(f"| {i} | {m.get('peak_rss_bytes', 0) / 2**20:.1f} | "
                         f"{m.get('model_state_bytes', 0) / 2**20:.1f} |")
    return "\n".join(lines) + "\n"
