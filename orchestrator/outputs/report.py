"""Render a run's ``report.json`` as the Markdown page a person reads first."""

from __future__ import annotations

import re
from collections import defaultdict


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def structured_recipe(s: dict) -> str:
    """A structured run's options in words (``s``: the config's ``structured`` section)."""
    parts = [f"{s['allocation']} allocation", "MLP channels only" if s.get("modules") == "mlp" else None,
             f"{s['depth_blocks']} blocks removed first" if s.get("depth_blocks") else None,
             ("compensated, groups chosen by reconstruction" if s.get("selection") == "reconstruction"
              else "compensated") if s.get("compensate") else None]
    rec = s.get("recovery", {})
    if rec.get("enabled"):
        parts.append("LoRA recovery by " + ("distillation" if rec.get("loss") == "kd" else "cross-entropy"))
    return ", ".join(p for p in parts if p)


def _pruned_line(report: dict) -> str:
    st = report.get("structured")
    if st:
        before, after = st["parameters_before"], st["parameters_after"]
        return (f"- structured ({structured_recipe(report['config']['structured'])}): "
                f"{before - after:,} of {before:,} parameters removed ({(before - after) / before:.2%})")
    sp = report["sparsity"]
    return (f"- sparsity: target {sp['target']:.4f}, reached {sp['reached']:.4f} "
            f"({sp['zeros']:,} of {sp['pruned_weights_total']:,} pruned-layer weights are zero)")


def render_markdown(report: dict) -> str:
    """Markdown summary: config, metrics against dense, per-block sparsity, phase timings."""
    cfg = report["config"]
    pr, met = cfg["pruning"], report["metrics"]
    title = "structured (SAAP)" if report.get("structured") else f"{pr['method']} {pr['pattern']}"
    lines = [
        f"# rayprune run: {title} on {cfg['model']['source']}",
        "",
        f"- model: `{report['model']['path']}` ({report['model']['architecture']}, "
        f"{report['model']['parameters']:,} parameters)",
        f"- calibration: {report['calibration']['samples']} x {report['calibration']['seq_len']} tokens "
        f"from `{cfg['calibration']['source']}` (seed {cfg['calibration']['seed']})",
        f"- backend: {cfg['backend']['kind']}"
        + (f" with {cfg['backend']['workers']} workers" if cfg["backend"]["kind"] == "ray" else ""),
        _pruned_line(report),
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
        lines.append("No perplexity evaluation was run (set `eval.source`).")
    lines += _zeroshot_lines(report) + _sweep_lines(report) + _speed_lines(report)
    lines += ["", "## Sparsity per block", "", "![sparsity per layer](sparsity_per_layer.png)", "",
              "| block | weights | mean sparsity |", "|---|---|---|"]
    per_block: dict[int, list[float]] = defaultdict(list)
    for row in report["layers"]:
        m = re.search(r"\.(\d+)\.", row["name"])
        per_block[int(m.group(1)) if m else -1].append(row["sparsity"])
    for block in sorted(per_block):
        vals = per_block[block]
        lines.append(f"| {block} | {len(vals)} | {sum(vals) / len(vals):.4f} |")
    lines += ["", "## Phases", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["phases"].items()]
    if report.get("compute_dtypes"):
        d = report["compute_dtypes"]
        lines += ["", f"Autocast: block forwards {d['forward_dtype']}, gradient pass {d['grad_dtype']} "
                      "(statistics in fp32)."]
    if report.get("memory_per_worker"):
        lines += ["", "## Memory per worker", "",
                  "| worker | peak allocated (MiB; the plan's peak) | peak RSS (MiB) | model state (MiB) |",
                  "|---|---|---|---|"]
        for i, m in enumerate(report["memory_per_worker"]):
            # a CPU worker samples its peak only when traced (RAYPRUNE_TRACE_MEMORY=1; sampling costs time)
            alloc = (f"{m.get('peak_allocated_above_start_bytes', 0) / 2**20:.1f}" if m.get("allocated_peak_traced")
                     else "- (RAYPRUNE_TRACE_MEMORY=1)")
            lines.append(f"| {i} | {alloc} | {m.get('peak_rss_bytes', 0) / 2**20:.1f} | "
                         f"{m.get('model_state_bytes', 0) / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def _zeroshot_lines(report: dict) -> list[str]:
    """One row per task and metric (value ± standard error per model); a skipped task is one row."""
    zs = report.get("zeroshot") or {}
    if not zs:
        return []
    models = list(zs)
    tasks = sorted({t for m in models for t in zs[m]})
    lines = ["", "## Task metrics", "",
             "Zero-shot multiple choice and lm-eval tasks (value ± standard error; `k-shot`: in-context examples).",
             "", "| task | metric | " + " | ".join(models) + " | n |", "|---|---|" + "---|" * len(models) + "---|"]
    for t in tasks:
        results = [zs[m].get(t, {}) for m in models]
        ok = [r for r in results if r.get("status", "ok") == "ok" and r]
        metrics: list[str] = []
        for k in (k for r in ok for k in r):
            if k not in metrics and k not in _NOT_METRICS and not k.partition(",")[0].endswith("_stderr"):
                metrics.append(k)
        metrics.sort(key=lambda k: k not in ("acc", "acc_norm"))  # those first, the others as the task gives them
        shots = next((r["num_fewshot"] for r in ok if r.get("num_fewshot")), 0)
        label = f"{t} ({shots}-shot)" if shots else t
        n = next((r["n"] for r in reversed(ok) if "n" in r), "-")
        if not metrics:
            lines.append(f"| {label} | - | " + " | ".join(r.get("status", "-") for r in results) + " | - |")
        for metric in metrics:
            cells = [_metric_cell(r, metric) for r in results]
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + f" | {n} |")
    return lines


_NOT_METRICS = ("status", "source", "n", "num_fewshot", "reason")


def _metric_cell(result: dict, metric: str) -> str:
    """``value ± stderr`` of one metric, or the task's status when it did not run."""
    if result.get("status", "ok") != "ok":
        return result.get("status", "-")
    name, comma, filt = metric.partition(",")
    stderr = result.get(f"{name}_stderr{comma}{filt}")
    value = _fmt(result.get(metric))
    return value if stderr is None else f"{value} ± {_fmt(stderr)}"


def _sweep_lines(report: dict) -> list[str]:
    rows = report.get("sweep") or []
    if not rows:
        return []
    passes = report.get("sweep_passes", {})
    lines = ["", "## Sweep", "",
             f"{len(rows)} candidates from {passes.get('gradient', 0)} gradient-statistics pass(es) and "
             f"{passes.get('activation', 0)} activation pass(es). ![perplexity vs sparsity](sweep_ppl.png)", "",
             f"| sparsity | reached | perplexity (context {report['metrics'].get('eval_seq_len')}) |", "|---|---|---|"]
    lines += [f"| {r['sparsity']:.4g} | {_fmt(r.get('reached'))} | {_fmt(r.get('ppl'))} |" for r in rows]
    return lines


def speed_verdict(dense: dict, pruned: dict) -> str:
    """``"1.42x"`` when the pruned model's tokens/s range lies wholly above or below the dense one's,
    else ``"no measurable difference"`` (medians inside each other's spread are noise)."""
    lo_d, hi_d = dense.get("range") or (dense["median"], dense["median"])
    lo_p, hi_p = pruned.get("range") or (pruned["median"], pruned["median"])
    if lo_p <= hi_d and lo_d <= hi_p:
        return "no measurable difference"
    return f"{pruned['median'] / dense['median']:.2f}x"


def _speed_lines(report: dict) -> list[str]:
    sp = report.get("speed")
    if not sp:
        return []
    lines = ["", "## Generation speed", "",
             f"Prompt {sp['prompt_len']} tokens, {sp['new_tokens']} new tokens (greedy), medians of "
             f"{sp.get('repeats', '?')} repeats with the slowest-fastest range; models measured interleaved in "
             "one process.", ""]
    dense = sp["models"].get("dense")
    shapes_shrunk = bool(report.get("structured"))
    if not shapes_shrunk:
        lines += ["This run keeps every matrix at its dense shape (sparse weights in dense kernels), so it gives "
                  "no speedup; the table shows that the measurement agrees.", ""]
    lines += ["| model | batch | prefill tokens/s | decode tokens/s | matmul GFLOP/token | prefill vs dense | "
              "decode vs dense |", "|---|---|---|---|---|---|---|"]
    for name, m in sp["models"].items():
        gf = m.get("flops_per_token")
        for b in m["batches"]:
            verdicts = ["", ""]
            ref = next((r for r in dense["batches"] if r["batch_size"] == b["batch_size"]), None) if dense else None
            if ref is not None and name != "dense":
                verdicts = [speed_verdict({"median": ref[k], "range": ref.get(f"{k}_range")},
                                          {"median": b[k], "range": b.get(f"{k}_range")})
                            for k in ("prefill_tps", "decode_tps")]
                if not shapes_shrunk:
                    verdicts = [v if v == "no measurable difference" else f"{v} (noise: shapes unchanged)"
                                for v in verdicts]
            lines.append(f"| {name} | {b['batch_size']} | {_tps(b, 'prefill_tps')} | {_tps(b, 'decode_tps')} | "
                         f"{'-' if gf is None else f'{gf / 1e9:.3f}'} | {verdicts[0]} | {verdicts[1]} |")
    return lines


def _tps(row: dict, key: str) -> str:
    rng = row.get(f"{key}_range")
    return f"{row[key]:.1f}" + (f" ({rng[0]:.1f}-{rng[1]:.1f})" if rng else "")


def _sweep_plot(report: dict, out_dir, plt) -> list[str]:
    rows = [r for r in report.get("sweep") or [] if r.get("ppl")]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["sparsity"] for r in rows], [r["ppl"] for r in rows], marker="o", label=report["config"]["pruning"][
        "method"])
    dense = report["metrics"].get("dense_ppl")
    if dense:
        ax.axhline(dense, color="k", lw=0.8, ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"perplexity (context {report['metrics'].get('eval_seq_len')})")
    ax.set_title("perplexity vs sparsity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sweep_ppl.png", dpi=110)
    plt.close(fig)
    return ["sweep_ppl.png"]


def render_plots(report: dict, out_dir) -> list[str]:
    """Write the report's PNG plots into ``out_dir``; returns the file names written.

    Plots: reached sparsity per pruned weight, in model order (``sparsity_per_layer.png``),
    the mean kept importance score per weight (``importance_per_layer.png``) when the
    method has scores, and perplexity vs sparsity for sweeps (``sweep_ppl.png``).
    """
    import math
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = report["layers"]
    written: list[str] = _sweep_plot(report, out_dir, plt)
    if not rows:
        return written
    names = [r["name"] for r in rows]
    kinds = sorted({n.rsplit(".", 2)[-2] for n in names})
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for kind in kinds:
        xs = [i for i, n in enumerate(names) if n.rsplit(".", 2)[-2] == kind]
        ax.scatter(xs, [rows[i]["sparsity"] for i in xs], s=10, label=kind)
    ax.axhline(report["sparsity"]["target"], color="k", lw=0.8, ls="--", label="target")
    ax.set_xlabel("pruned weight (model order)")
    ax.set_ylabel("reached sparsity")
    ax.set_title(f"{report['config']['pruning']['method']} {report['config']['pruning']['pattern']}: "
                 f"sparsity per layer (overall {report['sparsity']['reached']:.4f})")
    ax.legend(ncol=min(len(kinds) + 1, 8), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "sparsity_per_layer.png", dpi=110)
    plt.close(fig)
    written.append("sparsity_per_layer.png")
    scores = [r.get("score_mean") for r in rows]
    if any(s is not None and not math.isnan(s) for s in scores):
        fig, ax = plt.subplots(figsize=(10, 3.6))
        for kind in kinds:
            xs = [i for i, n in enumerate(names) if n.rsplit(".", 2)[-2] == kind]
            ax.plot(xs, [scores[i] for i in xs], marker=".", lw=0.8, label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("pruned weight (model order)")
        ax.set_ylabel("mean importance of kept weights")
        ax.set_title("importance per layer")
        ax.legend(ncol=min(len(kinds), 7), fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "importance_per_layer.png", dpi=110)
        plt.close(fig)
        written.append("importance_per_layer.png")
    return written


def rerender(run_dir) -> list[str]:
    """Re-render ``report.md`` and the plots of a run from its ``report.json``.

    Raises:
        UsageError: the directory has no readable ``report.json``.
    """
    import json
    import os
    from pathlib import Path

    from orchestrator.errors import UsageError

    run = Path(run_dir)
    try:
        report = json.loads((run / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"RUN_DIR: {str(run)!r} has no readable report.json ({exc})") from None
    tmp = run / ".report.md.tmp"
    tmp.write_text(render_markdown(report))
    os.replace(tmp, run / "report.md")
    return ["report.md", *render_plots(report, run)]


def validate_report(report: dict) -> None:
    """Check a report against ``orchestrator/outputs/report_schema.json`` (JSON Schema draft 2020-12).

    Raises:
        UsageError: the report violates the schema; the message lists every violation
            (up to 10) as ``path: problem``.
    """
    import json
    from pathlib import Path

    from jsonschema import Draft202012Validator

    from orchestrator.errors import UsageError

    schema = json.loads((Path(__file__).with_name("report_schema.json")).read_text())
    errors = sorted(Draft202012Validator(schema).iter_errors(report), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors[:10]]
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise UsageError(f"report.json does not match its schema: {'; '.join(lines)}{more}")
