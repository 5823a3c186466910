"""The quantization hand-off: an llm-compressor recipe that quantizes a pruned checkpoint and keeps its zeros.

Sparsity alone pays little in today's serving runtimes (vLLM removed its 2:4 sparse kernels in 2026); it
pays combined with quantization, or in runtimes with sparse kernels. ``rayprune export RUN_DIR --scheme S``
writes ``RUN_DIR/quantize/recipe-S.yaml`` and the ``oneshot`` call that applies it in llm-compressor's own
environment. Round-to-nearest symmetric quantization (``W8A8``, ``FP8_DYNAMIC``, ``W4A16`` by
``QuantizationModifier``) maps zero to zero, so the pruned zeros survive; GPTQ (``W4A16-GPTQ``) updates every
weight of a column block from the quantization errors, zeros included (llm-compressor 0.14 has no mask for
them): better int4 weights, not a sparse model (``tests/benchmarks/quant_handoff.py`` measures both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: scheme name -> (llm-compressor modifier, compressed-tensors preset scheme, what it is)
SCHEMES: dict[str, tuple[str, str, str]] = {
    "W8A8": ("QuantizationModifier", "W8A8", "int8 weights (per channel) and int8 activations (per token, dynamic)"),
    "FP8_DYNAMIC": ("QuantizationModifier", "FP8_DYNAMIC", "fp8 weights (per channel), fp8 activations (dynamic)"),
    "W4A16": ("QuantizationModifier", "W4A16", "int4 weights (groups of 128), 16-bit activations, round-to-nearest"),
    "W4A16-GPTQ": ("GPTQModifier", "W4A16", "int4 weights (groups of 128) solved by GPTQ on calibration data, "
                   "which fills the zeros"),
}


def recipe(scheme: str, group_size: int = 128) -> dict[str, Any]:
    """The llm-compressor recipe (as its YAML holds) quantizing every linear but the head with ``scheme``.

    Args:
        scheme: a key of :data:`SCHEMES`.
        group_size: weights per int4 scale (the ``W4A16`` schemes): it must divide every linear's input size
            (128, the preset, does not divide SmolLM2-135M's 576).

    Raises:
        ValueError: an unknown scheme or a non-positive group size.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    modifier, preset, _ = SCHEMES[scheme]
    body: dict[str, Any] = {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": preset}
    if preset == "W4A16" and group_size != 128:  # the preset's fields with another group size
        body = {"ignore": ["lm_head"], "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                               "strategy": "group", "group_size": group_size}}}}
    return {"quant_stage": {"quant_modifiers": {modifier: body}}}


def needs_calibration(scheme: str) -> bool:
    """Whether applying ``scheme`` reads calibration data (GPTQ and static activation scales do)."""
    return SCHEMES[scheme][0] == "GPTQModifier"


def write(run_dir: Path, scheme: str, out: Path | None = None, group_size: int = 128) -> dict[str, Any]:
    """Write the recipe of ``scheme`` for the run in ``run_dir``; returns what the CLI prints.

    Raises:
        FileNotFoundError: ``run_dir`` has no pruned checkpoint (``model/config.json``).
    """
    import yaml

    model = Path(run_dir) / "model"
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no pruned checkpoint (model/config.json)")
    report = json.loads((Path(run_dir) / "report.json").read_text()) if (Path(run_dir) / "report.json").is_file() \
        else {}
    reached = report.get("sparsity", {}).get("reached")
    path = Path(out) if out else Path(run_dir) / "quantize" / f"recipe-{scheme}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    keeps = "keeping its zeros" if SCHEMES[scheme][0] == "QuantizationModifier" else "NOT keeping its zeros"
    header = [f"# rayprune export: quantize {model} with llm-compressor ({SCHEMES[scheme][2]}), {keeps}",
              f"# pruned sparsity of the decoder's linear weights: {reached:.2%}" if reached is not None else "#",
              "# apply in llm-compressor's environment (README 'Quantization hand-off'):",
              f"#   oneshot(model='{model}', recipe='{path}', output_dir='{model}-{scheme}', save_compressed=True"
              + (", dataset=..., num_calibration_samples=..." if needs_calibration(scheme) else "") + ")"]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(recipe(scheme, group_size), sort_keys=False))
    return {"recipe": str(path), "model": str(model), "scheme": scheme, "calibration": needs_calibration(scheme),
            "sparsity": reached}
