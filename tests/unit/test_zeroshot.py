"""Zero-shot multiple choice: scoring against a plain reimplementation, acc vs acc_norm, task files."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.evaluation.zeroshot import aggregate, builtin_tasks, encode_pair, load_task, score_examples
from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(TinyModelConfig(**TINY))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def examples() -> list[dict]:
    cloze = [e for e in load_task("debian_cloze") if len(e["context"]) < 90][:6]
    return [
        *cloze,
        {"context": "The quick brown fox jumps over the", "choices": [" lazy dog", " moon", " a"], "label": 0},
        {"context": "apt-get install ", "choices": ["vim", "emacs editor", "x"], "label": 1},  # trailing space moves
        {"context": "x" * 300, "choices": [" long", " longer one"], "label": 1},  # beyond 256 positions: truncated
    ]


@torch.no_grad()
def reference_loglik(model, tok, context: str, choice: str, max_length: int = 256) -> float:
    """Plain reimplementation: one full forward of context + choice, sum of the choice's log-probs.

    As in lm-eval, trailing whitespace of the context belongs to the continuation.
    """
    stripped = context.rstrip()
    choice = context[len(stripped):] + choice
    ctx, cont = tok(stripped)["input_ids"], tok(choice)["input_ids"]  # byte level: no boundary merges
    ids = torch.tensor([(ctx + cont)[-(max_length + 1):]])  # (1, T)
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    tgt = ids[0, 1:]
    return float(logp[-len(cont):].gather(1, tgt[-len(cont):, None]).sum())


@pytest.fixture(scope="module")
def reference(tiny, tok) -> list[list[float]]:
    return [[reference_loglik(tiny, tok, ex["context"], c) for c in ex["choices"]] for ex in examples()]


@pytest.mark.parametrize("kwargs", [
    {"reuse_context": True},
    {"max_batch_tokens": 600},  # several padded batches
    {"max_logits": 1},  # one request per forward
], ids=["kv-cache", "batched", "unbatched"])
def test_matches_reference(tiny, tok, reference, kwargs):
    exs = examples()
    got = score_examples(tiny, tok, exs, **kwargs)
    assert len(got) == len(exs)
    for ex, res, ref in zip(exs, got, reference, strict=True):
        # the KV-cache path runs the same shapes as the reference; padded batches round differently (~1e-7 rel)
        torch.testing.assert_close(torch.tensor(res["loglik"], dtype=torch.float64),
                                   torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-5)
        assert res["acc"] == int(max(range(len(ref)), key=ref.__getitem__) == ex["label"])
        norm = [v / len(c) for v, c in zip(ref, ex["choices"], strict=True)]
        assert res["acc_norm"] == int(max(range(len(norm)), key=norm.__getitem__) == ex["label"])


def test_acc_norm_differs_where_length_matters(tok):
    model = build_tiny_llama(TinyModelConfig(**TINY))
    lm_head = torch.nn.Linear(64, 257, bias=True)  # constant logits: every position favours byte "a"
    torch.nn.init.zeros_(lm_head.weight)
    with torch.no_grad():
        lm_head.bias.zero_()
        lm_head.bias[tok("a")["input_ids"][0]] = 4.0
    model.lm_head = lm_head
    ex = {"context": "pick one:", "choices": [" b", " aaaaaaaaaa"], "label": 1}
    (res,) = score_examples(model, tok, [ex])
    short, long = res["loglik"]
    assert short > long  # fewer tokens, higher total log-prob ...
    assert long / 11 > short / 2  # ... but the long one is likelier per character
    assert (res["acc"], res["acc_norm"]) == (0, 1)


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = encode_pair(tok, "install ", "vim")
    assert ctx == tok("install")["input_ids"] and cont == tok(" vim")["input_ids"]
    ctx, cont = encode_pair(tok, "", "ab")
    assert ctx == [tok.eos_token_id] and cont == tok("ab")["input_ids"]


def test_aggregate_is_exact_over_splits(tiny, tok):
    res = score_examples(tiny, tok, examples())
    whole = aggregate(res)
    split = aggregate(res[:4] + res[4:])
    assert whole == split and whole["n"] == len(res)
    assert whole["acc"] == sum(r["acc"] for r in res) / len(res)
    p = whole["acc"]
    assert whole["acc_stderr"] == pytest.approx((p * (1 - p) * len(res) / (len(res) - 1) / len(res)) ** 0.5)


def test_builtin_task_is_well_formed():
    assert "debian_cloze" in builtin_tasks()
    exs = load_task("debian_cloze")
    assert len(exs) == 200
    assert all(len(e["choices"]) == 4 and e["choices"][e["label"]] for e in exs)
    assert len({e["label"] for e in exs}) == 4  # the answer position is shuffled


@pytest.mark.parametrize("line, field", [
    ("{not json", "not valid JSON"),
    ('["context"]', "expected an object"),
    ('{"choices": [" a", " b"], "label": 0}', "missing field 'context'"),
    ('{"context": "", "choices": [" a", " b"], "label": 0}', "field 'context'"),
    ('{"context": "c", "choices": " a", "label": 0}', "field 'choices'"),
    ('{"context": "c", "choices": [" a"], "label": 0}', "field 'choices'"),
    ('{"context": "c", "choices": [" a", 3], "label": 0}', "field 'choices'"),
    ('{"context": "c", "choices": [" a", " b"], "label": 2}', "field 'label'"),
    ('{"context": "c", "choices": [" a", " b"], "label": true}', "field 'label'"),
    ('{"context": "c", "choices": [" a", " b"]}', "missing field 'label'"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field):
    good = json.dumps({"context": "c", "choices": [" a", " b"], "label": 0})
    path = tmp_path / "task.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(UsageError) as info:
        load_task(path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and field in msg


def test_missing_and_empty_task_files(tmp_path):
    with pytest.raises(UsageError, match="not readable"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no examples"):
        load_task(tmp_path / "empty.jsonl")
