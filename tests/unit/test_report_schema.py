"""report.json against orchestrator/outputs/report_schema.json: a real tiny run validates, broken reports do not."""

from __future__ import annotations

import copy
import json

import pytest
from jsonschema import Draft202012Validator

from orchestrator.errors import UsageError
from orchestrator.outputs.report import validate_report
from orchestrator.surfaces.cli import main
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def report(tmp_path_factory, corpus_parquet, eval_parquet) -> dict:
    out = tmp_path_factory.mktemp("schema") / "run"
    code = main(["-q", "prune", *tiny_overrides(out, corpus_parquet, **{
        "pruning.method": "wanda", "eval.enabled": True, "eval.source": str(eval_parquet),
        "eval.num_windows": 2, "eval.seq_len": 32})])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def optional_sections() -> dict:
    task = {"acc": 0.5, "acc_norm": 0.75, "n": 4, "acc_stderr": 0.29, "acc_norm_stderr": 0.25}
    batch = {"batch_size": 1, "prefill_tps": 100.0, "decode_tps": 20.0, "prefill_s": 0.3, "decode_s": 6.3,
             "generated_tokens": 128}
    return {
        "zeroshot": {"dense": {"debian_cloze": task, "boolq": {"status": "skipped",
                                                               "reason": "skipped: boolq: data not reachable"}},
                     "pruned": {"debian_cloze": {**task, "status": "ok"}}},
        "speed": {"prompt_len": 512, "new_tokens": 128, "repeats": 3, "torch_threads": 2, "device": "cpu",
                  "models": {"dense": {"flops_per_token": 10, "batches": [batch, {**batch, "batch_size": 8}]}}},
        "sweep": [{"name": "0.5", "sparsity": 0.5, "reached": 0.5, "ppl": 30.1, "zeroshot": {"debian_cloze": task}},
                  {"sparsity": 0.7, "ppl": None}],
    }


def test_schema_is_valid_draft_2020_12():
    from pathlib import Path

    import orchestrator

    schema = json.loads((Path(orchestrator.__file__).parent / "outputs" / "report_schema.json").read_text())
    Draft202012Validator.check_schema(schema)


def test_real_tiny_run_validates(report):
    assert report["metrics"]["pruned_ppl"] > 0 and report["layers"]
    validate_report(report)
    validate_report(json.loads(json.dumps(report)))  # as re-read by `rayprune report`


def test_optional_sections_validate(report):
    validate_report({**report, **optional_sections()})


@pytest.mark.parametrize("mutate, where", [
    (lambda r: r.pop("sparsity"), "'sparsity' is a required property"),
    (lambda r: r["sparsity"].update(reached="0.5"), "sparsity.reached"),
    (lambda r: r["model"].update(parameters=1.5), "model.parameters"),
    (lambda r: r["layers"][0].pop("name"), "layers.0"),
    (lambda r: r["phases"].update(prune="slow"), "phases.prune"),
    (lambda r: r.update(schema_version="1"), "schema_version"),
    (lambda r: r["metrics"].update(pruned_ppl=-1.0), "metrics.pruned_ppl"),
])
def test_broken_reports_fail(report, mutate, where):
    bad = copy.deepcopy(report)
    mutate(bad)
    with pytest.raises(UsageError, match="does not match its schema") as info:
        validate_report(bad)
    assert where in str(info.value)


@pytest.mark.parametrize("mutate, where", [
    (lambda s: s["zeroshot"]["dense"]["debian_cloze"].update(acc=1.5), "zeroshot.dense.debian_cloze"),
    (lambda s: s["zeroshot"]["dense"]["boolq"].pop("reason"), "zeroshot.dense.boolq"),
    (lambda s: s["speed"]["models"]["dense"]["batches"][0].pop("decode_tps"), "speed.models.dense.batches.0"),
    (lambda s: s["sweep"][1].update(sparsity="high"), "sweep.1.sparsity"),
])
def test_broken_optional_sections_fail(report, mutate, where):
    extra = optional_sections()
    mutate(extra)
    with pytest.raises(UsageError) as info:
        validate_report({**report, **extra})
    assert where in str(info.value)
