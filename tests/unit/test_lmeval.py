"""lm-eval adapter: our local task through lm-eval agrees with zeroshot.py; unreachable data is skipped."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'eval'")

from orchestrator.evaluation import lmeval  # noqa: E402
from orchestrator.evaluation.zeroshot import aggregate, load_task, score_examples  # noqa: E402
from orchestrator.inputs.config import TinyModelConfig  # noqa: E402
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer  # noqa: E402
from tests.conftest import TINY  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(TinyModelConfig(**TINY))


def test_local_task_agrees_with_zeroshot(tiny, tmp_path):
    exs = load_task("debian_cloze")[:24]
    exs.append({"context": "apt-get install ", "choices": ["vim", "emacs editor", "x"], "label": 1})
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in exs))
    ours = aggregate(score_examples(tiny, byte_tokenizer(), exs))
    theirs = lmeval.run_lm_eval(tiny, byte_tokenizer(), tasks=[], local_tasks={"cloze": path}, batch_size=8)
    assert theirs["cloze"]["status"] == "ok"
    assert theirs["cloze"]["n"] == ours["n"] == len(exs)
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert theirs["cloze"][key] == pytest.approx(ours[key], abs=1e-12), key


def test_unreachable_tasks_are_skipped(tiny, monkeypatch):
    monkeypatch.setattr(lmeval, "hub_reachable", lambda timeout=3.0: False)  # as on an offline machine
    out = lmeval.run_lm_eval(tiny, byte_tokenizer(), tasks=["boolq", "arc_easy"], limit=2)
    assert set(out) == {"boolq", "arc_easy"}
    for name, res in out.items():
        assert res["status"] == "skipped"
        assert res["reason"].startswith(f"skipped: {name}: data not reachable")


def test_hub_probe_is_quick_and_boolean():
    assert lmeval.hub_reachable(timeout=1.0) in (True, False)
