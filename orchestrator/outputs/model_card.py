"""The model card of a pruned checkpoint: ``model/README.md``, what the Hugging Face Hub shows and
``huggingface_hub.ModelCard.load`` reads (metadata: base model, library and pipeline tags; body: how it was
pruned, the sparsity reached, the measured metrics and the command that reproduces it)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from orchestrator.outputs.report import structured_recipe

#: config sections whose settings the card lists (the rest: execution and evaluation plumbing)
_METHOD_KEYS = ("method", "sparsity", "pattern", "sequential", "allocation", "reconstruct", "gblm", "lstsq", "search",
                "admm", "swaps")


def base_model(source: str) -> str | None:
    """The card's ``base_model``: a hub id (``owner/name``) as it is; a local path or builtin: None."""
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists():
        return source
    return None


def render(report: dict[str, Any], command: str) -> str:
    """The card's text (YAML metadata between ``---`` lines, then Markdown) for a run's ``report``."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = report["config"]
    source = cfg["model"]["source"]
    structured = bool(cfg.get("structured", {}).get("enabled"))
    method = "saap (structured)" if structured else cfg["pruning"]["method"]
    data = ModelCardData(base_model=base_model(source), library_name="transformers",
                         pipeline_tag="text-generation",
                         tags=["rayprune", "pruned", "structured-pruning" if structured else "sparse",
                               f"method-{method.split()[0]}"])
    settings = {k: cfg["pruning"][k] for k in _METHOD_KEYS if k in cfg["pruning"]}
    if structured and report.get("structured"):
        st = report["structured"]
        before, after = st["parameters_before"], st["parameters_after"]
        what = f"{before - after:,} of its {before:,} parameters removed ({(before - after) / before:.2%})"
        how = f"- method: `{method}`: {structured_recipe(cfg['structured'])}"
    else:
        what = (f"{report['sparsity']['reached']:.2%} of the decoder's linear weights are zero "
                f"(target {report['sparsity']['target']})")
        how = f"- method: `{method}`, settings: `{settings}`"
    lines = [f"# {Path(source).name or source}, pruned with rayprune ({method})", "",
             f"Pruned from `{source}` by rayprune {report.get('rayprune_version', '')}: {what}.", "",
             "## How", "",
             how,
             f"- calibration: {report['calibration']['samples']} sequences x {report['calibration']['seq_len']} "
             f"tokens of `{cfg['calibration']['source']}`",
             f"- compute dtypes: `{report.get('compute_dtypes')}`", "",
             "## Measured", ""]
    metrics = report.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation ran (`eval.enabled: false`).")
    lines += ["", "## Reproduce", "", "```bash", command, "```", "",
              "The masks (`masks/`) and the full report (`report.json`, `report.md`) are beside this folder in the "
              "run directory."]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n{{ body }}\n",
                                   body="\n".join(lines)).content


def reproduce_command(config_file: str = "config.yaml") -> str:
    """The command that reruns this run from the run directory's saved config."""
    return f"rayprune prune {shlex.quote(config_file)}"


def write(model_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``model_dir/README.md``; returns its path."""
    path = Path(model_dir) / "README.md"
    path.write_text(render(report, reproduce_command()))
    return path
