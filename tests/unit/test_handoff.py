"""The quantization hand-off: ``rayprune export`` writes the llm-compressor recipe of a run's checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.outputs import handoff
from orchestrator.surfaces.cli import main


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "report.json").write_text(json.dumps({"sparsity": {"reached": 0.5}}))
    return tmp_path


@pytest.mark.parametrize("scheme,modifier,preset", [("W8A8", "QuantizationModifier", "W8A8"),
                                                    ("FP8_DYNAMIC", "QuantizationModifier", "FP8_DYNAMIC"),
                                                    ("W4A16", "QuantizationModifier", "W4A16"),
                                                    ("W4A16-GPTQ", "GPTQModifier", "W4A16")])
def test_each_scheme_quantizes_every_linear_but_the_head(scheme, modifier, preset):
    mods = handoff.recipe(scheme)["quant_stage"]["quant_modifiers"]
    assert mods == {modifier: {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": preset}}
    assert handoff.needs_calibration(scheme) == (modifier == "GPTQModifier")


def test_export_writes_the_recipe_beside_the_run_and_prints_one_json_line(run_dir, capsys):
    assert main(["export", str(run_dir), "--scheme", "W4A16-GPTQ"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = run_dir / "quantize" / "recipe-W4A16-GPTQ.yaml"
    assert line == {"recipe": str(path), "model": str(run_dir / "model"), "scheme": "W4A16-GPTQ",
                    "calibration": True, "sparsity": 0.5}
    text = path.read_text()
    assert yaml.safe_load(text) == handoff.recipe("W4A16-GPTQ") and "50.00%" in text and "oneshot(" in text


def test_export_of_a_directory_without_a_checkpoint_is_a_usage_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "has no pruned checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown scheme"):
        handoff.recipe("W2A2")


def test_another_int4_group_size_spells_the_presets_fields_out():
    body = handoff.recipe("W4A16", group_size=64)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert body["ignore"] == ["lm_head"] and "scheme" not in body
    assert body["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                           "strategy": "group", "group_size": 64}
    assert handoff.recipe("W8A8", group_size=64) == handoff.recipe("W8A8")  # int8 is per channel: no groups
    with pytest.raises(ValueError, match="group_size"):
        handoff.recipe("W4A16", group_size=0)
