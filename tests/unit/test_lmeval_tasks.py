"""lm-eval tasks as practitioners run them: per-task specs, task YAML files, every metric in the report."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.errors import UsageError
from orchestrator.evaluation.lmeval import LmEvalTask, parse_task_spec, resolve_tasks, summarize, yaml_task_name
from orchestrator.outputs.report import _zeroshot_lines


@pytest.mark.parametrize("entry, want", [
    ("lm_eval:hellaswag", LmEvalTask("hellaswag")),
    ("lm_eval:hellaswag@num_fewshot=10,limit=200", LmEvalTask("hellaswag", 10, 200)),
    ("lm_eval:arc_easy@limit=5", LmEvalTask("arc_easy", None, 5)),
    ("lm_eval:tasks/my_task.yaml@num_fewshot=2", LmEvalTask("tasks/my_task.yaml", 2)),
    ("lm_eval:arc_easy@ limit = 3 , num_fewshot = 0", LmEvalTask("arc_easy", 0, 3)),
    ("boolq@num_fewshot=0", LmEvalTask("boolq", 0)),  # the prefix is optional here
])
def test_spec_parsing(entry, want):
    spec = parse_task_spec(entry)
    assert spec == want
    assert parse_task_spec(str(spec)) == spec  # str() writes the spec back


@pytest.mark.parametrize("entry, says", [
    ("lm_eval:", "no task name"),
    ("lm_eval:@limit=3", "no task name"),
    ("lm_eval:hellaswag@", "unknown option ''"),
    ("lm_eval:hellaswag@shots=3", "unknown option 'shots'"),
    ("lm_eval:hellaswag@limit", "option 'limit' has no value"),
    ("lm_eval:hellaswag@limit=0", "limit='0' must be a whole number >= 1"),
    ("lm_eval:hellaswag@num_fewshot=-1", "num_fewshot='-1' must be a whole number >= 0"),
    ("lm_eval:hellaswag@num_fewshot=1.5", "num_fewshot='1.5' must be a whole number"),
    ("lm_eval:hellaswag@limit=²", "must be a whole number"),
    ("lm_eval:hellaswag@limit=3,limit=4", "option 'limit' given twice"),
])
def test_bad_specs_are_one_line_usage_errors(entry, says):
    with pytest.raises(UsageError) as info:
        parse_task_spec(entry)
    msg = str(info.value)
    assert msg.startswith(f"eval.tasks: {entry!r}: ") and says in msg and "\n" not in msg, msg


def test_resolve_fills_defaults_and_checks_task_files(tmp_path, monkeypatch):
    (tmp_path / "t.yaml").write_text("task: my_task\ndoc_to_text: !function utils.doc_to_text\n")
    monkeypatch.chdir(tmp_path)
    got = resolve_tasks(["debian_cloze", "lm_eval:boolq", "lm_eval:piqa@num_fewshot=3,limit=7",
                         "lm_eval:t.yaml@limit=2"], num_fewshot=1, limit=50)
    assert got == [LmEvalTask("boolq", 1, 50), LmEvalTask("piqa", 3, 7),
                   LmEvalTask(str(tmp_path / "t.yaml"), 1, 2)]
    assert yaml_task_name(tmp_path / "t.yaml") == "my_task"  # `!function` read, nothing imported
    assert got[2].identity().startswith(f"{tmp_path / 't.yaml'}@num_fewshot=1,limit=2 sha256:")
    with pytest.raises(UsageError, match="task file 'missing.yaml' not found"):
        resolve_tasks(["lm_eval:missing.yaml"])
    (tmp_path / "bad.yml").write_text("dataset_path: json\n")
    with pytest.raises(UsageError, match="has no `task:` name"):
        resolve_tasks(["lm_eval:bad.yml"])


def test_the_evaluator_resolves_specs_with_the_run_defaults(tmp_path):
    from orchestrator.evaluation.evaluator import Evaluator
    from orchestrator.inputs.loader import config_from_dict

    def evaluator(tasks):
        cfg = config_from_dict({"eval": {"tasks": tasks, "num_fewshot": 5, "task_limit": 100},
                                "backend": {"kind": "local"}})
        return Evaluator(cfg, str(tmp_path), None, None, progress=False)

    ev = evaluator(["debian_cloze", "lm_eval:hellaswag@num_fewshot=10,limit=200", "lm_eval:piqa"])
    assert ev.lm_eval_specs == [LmEvalTask("hellaswag", 10, 200), LmEvalTask("piqa", 5, 100)]
    assert ev.lm_eval_tasks == ["hellaswag@num_fewshot=10,limit=200", "piqa@num_fewshot=5,limit=100"]
    assert list(ev.tasks) == ["debian_cloze"] and ev.active
    with pytest.raises(UsageError, match="eval.tasks: 'lm_eval:piqa@fewshot=1': unknown option 'fewshot'"):
        evaluator(["lm_eval:piqa@fewshot=1"])


def test_summary_keeps_every_metric_and_filter():
    res = {"results": {"t": {"alias": "t", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                             "exact_match,none": 0.5, "exact_match_stderr,none": "N/A",
                             "word_perplexity,none": float("inf"), "word_perplexity_stderr,none": "N/A"}},
           "n-samples": {"t": {"original": 10, "effective": 4}}, "n-shot": {"t": 3}}
    assert summarize(res, "t") == {"status": "ok", "exact_match,strict-match": 0.25,
                                   "exact_match_stderr,strict-match": 0.1, "exact_match": 0.5,
                                   "exact_match_stderr": None, "word_perplexity": None,
                                   "word_perplexity_stderr": None, "n": 4, "num_fewshot": 3}


def test_markdown_has_a_row_per_task_and_metric():
    lm = {"status": "ok", "word_perplexity": 812.5, "word_perplexity_stderr": None, "bits_per_byte": 7.9,
          "bits_per_byte_stderr": None, "n": 3, "num_fewshot": 0, "source": "lm-eval"}
    mc = {"status": "ok", "acc": 0.5, "acc_stderr": 0.25, "acc_norm": 0.75, "acc_norm_stderr": 0.2, "n": 4,
          "num_fewshot": 2, "source": "lm-eval"}
    lines = _zeroshot_lines({"zeroshot": {
        "dense": {"lm_eval:ppl": lm, "lm_eval:mc": mc, "lm_eval:boolq": {"status": "skipped", "reason": "x"}},
        "pruned": {"lm_eval:ppl": {**lm, "word_perplexity": 901.0}, "lm_eval:mc": mc}}})
    assert "| task | metric | dense | pruned | n |" in lines
    assert "| lm_eval:boolq | - | skipped | - | - |" in lines
    assert "| lm_eval:mc (2-shot) | acc | 0.5 ± 0.25 | 0.5 ± 0.25 | 4 |" in lines
    assert "| lm_eval:mc (2-shot) | acc_norm | 0.75 ± 0.2 | 0.75 ± 0.2 | 4 |" in lines
    assert "| lm_eval:ppl | word_perplexity | 812.5 | 901 | 3 |" in lines
    assert "| lm_eval:ppl | bits_per_byte | 7.9 | 7.9 | 3 |" in lines


def test_the_service_policy_reads_specs_caps_limits_and_refuses_task_files():
    from orchestrator.inputs.loader import config_from_dict
    from orchestrator.surfaces.serve.policy import JobPolicy, policy_problems

    policy = JobPolicy(lm_eval_tasks=["arc_*"], max_task_examples=50)

    def problems(tasks, limit=None):
        return policy_problems(config_from_dict({"eval": {"tasks": tasks, "task_limit": limit}}), policy)

    assert problems(["lm_eval:arc_easy@num_fewshot=5,limit=50"]) == []  # a limit of its own is enough
    assert problems(["lm_eval:arc_easy@num_fewshot=5"], limit=20) == []
    assert [p.split(":")[0] for p in problems(["lm_eval:arc_easy@num_fewshot=5"])] == ["eval.task_limit"]
    assert problems(["lm_eval:arc_easy@limit=51"], limit=20) == [
        "eval.tasks[0] limit: 51 exceeds the service limit of 50 (policy max_task_examples)"]
    refused = problems(["lm_eval:hellaswag@limit=5", "lm_eval:/data/t.yaml@limit=5", "lm_eval:arc_easy@shots=1"],
                       limit=5)
    assert [p.split(": ")[0] for p in refused] == ["eval.tasks[0]", "eval.tasks[1]", "eval.tasks[2]"], refused
    assert "not a builtin task, an allowed file or an allowed lm-eval task" in refused[0]
    assert "task files are refused" in refused[1] and "unknown option 'shots'" in refused[2]


# ---- end to end, offline: a local task YAML over local data files, through lm-eval ----

QUESTIONS = [("2 + 2 =", [" 4", " 5", " 22"], 0), ("the sky is", [" green", " blue"], 1),
             ("apt-get install", [" vim", " emacs", " nano"], 2), ("python is a", [" snake", " language"], 1),
             ("debian uses", [" dpkg", " rpm"], 0), ("the capital of france is", [" rome", " paris"], 1)]
TEXTS = ["the quick brown fox jumps over the lazy dog", "a small model learns to predict tokens",
         "debian handbooks with loops functions classes"]


def _task_files(folder):
    """Local data, a multiple-choice task YAML (with a `!function` helper) and a rolling-loglikelihood one."""
    rows = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "helpers.py").write_text("def doc_to_text(doc):\n    return 'Q: ' + doc['question']\n")
    (folder / "mc.yaml").write_text(f"""
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {folder / 'train.jsonl'}
    test: {folder / 'test.jsonl'}
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: !function helpers.doc_to_text
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: brier_score
    higher_is_better: false
""")
    (folder / "ppl.yml").write_text(f"""
task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


def test_task_yaml_files_run_offline_with_few_shot(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'eval'")
    from orchestrator.evaluation import lmeval
    from orchestrator.inputs.config import TinyModelConfig
    from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
    from tests.conftest import TINY

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(lmeval, "hub_reachable", lambda timeout=3.0: False)  # no probe, offline datasets
    _task_files(tmp_path)
    out = lmeval.run_lm_eval(build_tiny_llama(TinyModelConfig(**TINY)), byte_tokenizer(),
                             tasks=[f"{tmp_path / 'mc.yaml'}@num_fewshot=2,limit=2", str(tmp_path / "ppl.yml")],
                             limit=3, batch_size=4)
    assert set(out) == {"tiny_mc", "tiny_ppl"}
    mc, ppl = out["tiny_mc"], out["tiny_ppl"]
    assert mc["status"] == ppl["status"] == "ok"
    assert mc["num_fewshot"] == 2 and mc["n"] == 2  # the spec's settings reached lm-eval
    assert ppl["num_fewshot"] == 0 and ppl["n"] == 3  # the defaults
    assert 0 <= mc["acc"] <= 1 and math.isfinite(mc["brier_score"]) and "acc_norm" not in mc
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(ppl[metric]) and ppl[metric] > 0, (metric, ppl)
        assert f"{metric}_stderr" in ppl
    assert ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"])

    zs = {k: {**v, "source": "lm-eval"} for k, v in out.items()}
    assert _schema_errors({"dense": zs, "pruned": zs}) == []  # report.json takes these results


def _schema_errors(zeroshot: dict) -> list[str]:
    """Problems of a ``zeroshot`` section against report_schema.json (its ``zeroshot_tasks``)."""
    from pathlib import Path

    from jsonschema import Draft202012Validator

    import orchestrator

    schema = json.loads((Path(orchestrator.__file__).parent / "outputs" / "report_schema.json").read_text())
    sub = {"$defs": schema["$defs"], **schema["properties"]["zeroshot"]}
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft202012Validator(sub).iter_errors(
        zeroshot)]


def test_schema_takes_any_metric_of_lm_eval_results():
    ours = {"status": "ok", "acc": 0.5, "acc_norm": 0.75, "acc_stderr": 0.29, "acc_norm_stderr": None, "n": 4,
            "source": "rayprune"}
    lm = {"status": "ok", "word_perplexity": 812.5, "word_perplexity_stderr": None, "bits_per_byte": 7.9,
          "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1, "n": 3, "num_fewshot": 5,
          "source": "lm-eval"}
    skipped = {"status": "skipped", "reason": "skipped: boolq: data not reachable"}
    assert _schema_errors({"dense": {"a": ours, "b": lm, "c": skipped, "d": {**ours, "source": "lm-eval"}}}) == []
    for bad in ({**ours, "acc": 1.5}, {**lm, "acc": 1.5}, {k: v for k, v in ours.items() if k != "acc_norm"},
                {**lm, "bits_per_byte": "low"}, {**lm, "word_perplexity_stderr": -1.0}, {**lm, "num_fewshot": -1},
                {k: v for k, v in lm.items() if k != "n"}, {**skipped, "reason": None}):
        assert _schema_errors({"dense": {"t": bad}}), bad


def test_a_run_reports_every_metric_in_report_json_and_md(tmp_path, monkeypatch, corpus_parquet):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'eval'")
    from orchestrator.evaluation import lmeval
    from orchestrator.surfaces.cli import main
    from tests.conftest import tiny_overrides

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(lmeval, "hub_reachable", lambda timeout=3.0: False)
    _task_files(tmp_path)
    tasks = [f"lm_eval:{tmp_path / 'mc.yaml'}@limit=2", f"lm_eval:{tmp_path / 'ppl.yml'}@num_fewshot=0"]
    out = tmp_path / "run"
    assert main(["-q", "prune", *tiny_overrides(out, corpus_parquet, **{
        "pruning.method": "magnitude", "eval.enabled": True, "eval.tasks": json.dumps(tasks),
        "eval.num_fewshot": 1, "eval.task_limit": 2})]) == 0
    report = json.loads((out / "report.json").read_text())  # validated against the schema when written
    for model in ("dense", "pruned"):
        mc, ppl = report["zeroshot"][model]["lm_eval:tiny_mc"], report["zeroshot"][model]["lm_eval:tiny_ppl"]
        assert (mc["num_fewshot"], mc["n"], ppl["num_fewshot"], ppl["n"]) == (1, 2, 0, 2)
        assert mc["source"] == ppl["source"] == "lm-eval" and math.isfinite(ppl["bits_per_byte"])
    md = (out / "report.md").read_text()
    assert "| lm_eval:tiny_mc (1-shot) | brier_score |" in md and "| lm_eval:tiny_ppl | bits_per_byte |" in md
