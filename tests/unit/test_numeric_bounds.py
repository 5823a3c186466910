"""Numbers no conversion can hold give one line naming the field, never an unhandled exception (issue 30,
finding 5): integer text beyond Python's 4300-digit conversion limit, numbers beyond the float range,
non-finite floats, and NaN in written reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.inputs.loader import config_from_dict, load_config
from orchestrator.surfaces.serve.auth import ApiError
from orchestrator.surfaces.serve.bodies import decode_json, parse_config_body

HUGE = "9" * 5000  # int("9" * 5000) raises ValueError in Python >= 3.11


@pytest.mark.parametrize("body,ctype,field", [
    ('{"calibration": {"num_samples": ' + HUGE + '}}', "application/json", "calibration.num_samples"),
    ("calibration:\n  num_samples: " + HUGE + "\n", "application/x-yaml", "calibration.num_samples"),
    ('{"pruning": {"sparsity": 1e400}}', "application/json", "pruning.sparsity"),
    ('{"pruning": {"sparsity": -' + HUGE + '}}', "application/json", "pruning.sparsity"),
])
def test_job_bodies_with_unconvertible_numbers_are_400_naming_the_field(body, ctype, field):
    with pytest.raises(ApiError) as err:
        parse_config_body(body.encode(), ctype)
    assert err.value.status == 400
    assert err.value.message.startswith(f"{field}: ")
    assert len(err.value.message) < 120  # one line, not the 5000 digits


def test_generate_body_with_a_huge_integer_is_refused_by_the_plain_check():
    from orchestrator.surfaces.serve.bodies import check_plain

    body = decode_json('{"prompt": "hi", "max_new_tokens": ' + HUGE + '}', "body")
    with pytest.raises(ApiError) as err:
        check_plain(body, "body")
    assert err.value.status == 400 and err.value.message.startswith("max_new_tokens: ")


@pytest.mark.parametrize("data,field,says", [
    ({"pruning": {"sparsity": 10**400}}, "pruning.sparsity", "out of range"),  # float(10**400): OverflowError
    ({"eval": {"num_windows": 10**400}}, "eval.num_windows", "out of range"),
    ({"calibration": {"seed": 2**63}}, "calibration.seed", "out of range"),
    ({"pruning": {"lstsq": {"percdamp": math.inf}}}, "pruning.lstsq.percdamp", "not a finite number"),
    ({"pruning": {"lstsq": {"percdamp": math.nan}}}, "pruning.lstsq.percdamp", "not a finite number"),
])
def test_config_fields_refuse_numbers_out_of_range(data, field, says):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    line = str(err.value)
    assert line.startswith(f"{field}: ") and says in line and len(line) < 160, line


@pytest.mark.parametrize("override,field", [
    (f"calibration.num_samples={HUGE}", "calibration.num_samples"),
    ("pruning.lstsq.percdamp=1e400", "pruning.lstsq.percdamp"),
    ("pruning.lstsq.percdamp=.nan", "pruning.lstsq.percdamp"),
])
def test_cli_overrides_with_unconvertible_numbers_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{field}: ")


def test_the_largest_64_bit_seed_is_still_accepted():
    assert config_from_dict({"calibration": {"seed": 2**63 - 1}}).calibration.seed == 2**63 - 1


def test_reports_are_strict_json_with_non_finite_places_listed(tmp_path: Path):
    from orchestrator.inputs.config import OutputConfig
    from orchestrator.outputs.artifacts import RunWriter
    from orchestrator.surfaces.serve.app import report_payload

    writer = RunWriter(OutputConfig(dir=str(tmp_path / "run")))
    writer.write_json("report.json", {"metrics": {"dense_ppl": 14.5, "pruned_ppl": math.inf},
                                      "zeroshot": {"t": {"acc": math.nan, "scores": [1.0, -math.inf]}}})
    text = writer.path("report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert report["metrics"] == {"dense_ppl": 14.5, "pruned_ppl": None}
    assert report["non_finite"] == ["metrics.pruned_ppl", "zeroshot.t.acc", "zeroshot.t.scores[1]"]
    # a report written before (NaN in the file) is served as strict JSON too
    old = '{"metrics": {"pruned_ppl": NaN}, "non_finite": []}'
    payload = report_payload(old, tmp_path / "report.json")
    assert payload == {"metrics": {"pruned_ppl": None}, "non_finite": ["metrics.pruned_ppl"]}
    json.dumps(payload, allow_nan=False)
    with pytest.raises(ApiError) as err:
        report_payload("{truncated", tmp_path / "report.json")
    assert err.value.status == 409
    writer.close()
