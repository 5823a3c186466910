"""More bad input through the CLI (issue 7): model files, data files, vocabularies, architectures, outputs.

Complements ``test_cli_errors.py`` (same contract: exit code 2, exactly one ``rayprune: error:`` line
naming the field and the offending value, and the output's parent directory left exactly as it was).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from orchestrator.errors import UsageError
from orchestrator.inputs.config import RunConfig, TinyModelConfig
from orchestrator.inputs.data import calibration_windows, check_vocab
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
from orchestrator.structured.groups import module_groups
from tests.conftest import TINY, tiny_overrides
from tests.unit.test_cli_errors import _listing, _run


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Broken and odd model directories, built once (outside each test's output parent)."""
    root = tmp_path_factory.mktemp("models")
    tiny, tok = build_tiny_llama(TinyModelConfig(**TINY)), byte_tokenizer()

    trunc = root / "truncated"
    tiny.save_pretrained(trunc)
    tok.save_pretrained(trunc)
    blob = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # valid header, data cut off

    pickle_only = root / "pickle-only"
    tiny.save_pretrained(pickle_only)
    tok.save_pretrained(pickle_only)
    (pickle_only / "model.safetensors").unlink()
    torch.save(tiny.state_dict(), pickle_only / "pytorch_model.bin")

    bigtok = root / "bigger-tokenizer"
    tiny.save_pretrained(bigtok)
    big = byte_tokenizer()
    big.add_tokens(["quick", "brown", "lazy"])  # ids 257..259: the model has 257 embedding rows
    big.save_pretrained(bigtok)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                               bos_token_id=256, eos_token_id=256)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)

    no_config = root / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    return {"truncated": trunc, "pickle": pickle_only, "bigtok": bigtok, "gpt2": gpt2, "no_config": no_config}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _parquet(path: Path, **columns: list) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# name -> (builder of the extra overrides given the test's directory and the models, expected substrings)
Case = tuple[Callable[[Path, dict[str, Path]], list[str]], tuple[str, ...]]
CASES: dict[str, Case] = {
    # config values (the rest is in test_cli_errors.py)
    "sparsity_one": (lambda t, m: ["pruning.sparsity=1"], ("pruning.sparsity: must be in (0, 1), got 1",)),
    "sparsity_negative": (lambda t, m: ["pruning.sparsity=-0.2"], ("pruning.sparsity: must be in (0, 1), got -0.2",)),
    "nm_n_equals_m": (lambda t, m: ["pruning.pattern=4:4"], ("pruning.pattern: '4:4' needs N < M",)),
    "nm_unsupported": (lambda t, m: ["pruning.pattern=1:3"], ("pruning.pattern: '1:3' is not one of",)),
    "unknown_section": (lambda t, m: ["prunning.method=wanda"], ("prunning: unknown key",)),
    "unknown_nested_key": (lambda t, m: ["model.tiny.layer=2"], ("model.tiny.layer: unknown key",)),
    "unknown_key_in_yaml": (
        lambda t, m: [str(_write(t / "c.yaml", b"pruning:\n  methd: wanda\n"))],
        ("pruning.methd: unknown key",),
    ),
    "calib_seq_len_one": (lambda t, m: ["calibration.seq_len=1"], ("calibration.seq_len: must be >= 2, got 1",)),
    "zero_eval_windows": (lambda t, m: ["eval.num_windows=0"], ("eval.num_windows: must be > 0, got 0",)),
    "zero_workers": (lambda t, m: ["backend.workers=0"], ("backend.workers: must be > 0, got 0",)),
    "negative_workers": (lambda t, m: ["backend.workers=-2"], ("backend.workers: must be > 0, got -2",)),
    "shard_without_eval_actors": (lambda t, m: ["eval.shard=true", "eval.workers=0"],
                                  ("eval.shard: needs evaluation actors to shard over", "eval.workers=0")),
    # model files
    "model_dir_without_config": (
        lambda t, m: [f"model.source={m['no_config']}"], ("model.source: directory", "has no config.json")),
    "model_config_not_json": (
        lambda t, m: [f"model.source={_mkmodel(t / 'm', b'{garbage')}"],
        ("model.source: cannot load a tokenizer from", "is not a valid JSON file"),
    ),
    "truncated_safetensors": (
        lambda t, m: [f"model.source={m['truncated']}"],
        ("model.source: cannot load", "truncated", "SafetensorError"),
    ),
    "pickle_only_checkpoint": (
        lambda t, m: [f"model.source={m['pickle']}"],
        ("model.source:", "pickle-only", "has only pickle weights (pytorch_model.bin)", "model.allow_pickle=true"),
    ),
    "gguf_random_bytes": (
        lambda t, m: [f"model.source={_write(t / 'rand.gguf', bytes(range(256)) * 16)}"],
        ("model.source:", "rand.gguf", "is not a loadable GGUF model", "does not start with the magic b'GGUF'"),
    ),
    "gguf_wrong_magic": (
        lambda t, m: [f"model.source={_write(t / 'magic.gguf', b'GGUX' + struct.pack('<IQQ', 3, 0, 0) + bytes(64))}"],
        ("model.source:", "magic.gguf", "is not a loadable GGUF model", "does not start with the magic b'GGUF'"),
    ),
    "gguf_truncated_header": (
        lambda t, m: [f"model.source={_write(t / 'cut.gguf', b'GGUF' + struct.pack('<IQQ', 3, 5, 3))}"],
        ("model.source:", "cut.gguf", "is not a loadable GGUF model"),
    ),
    "gguf_missing": (lambda t, m: [f"model.source={t}/gone.gguf"], ("model.source: GGUF file", "does not exist")),
    "tokenizer_bigger_than_model": (
        lambda t, m: [f"model.source={m['bigtok']}"],
        ("model.source: tokenizer of", "bigger-tokenizer", "has 260 tokens", "vocabulary has 257 entries"),
    ),
    "structured_unsupported_arch": (
        lambda t, m: [f"model.source={m['gpt2']}", "structured.enabled=true"],
        ("structured.enabled: model_type 'gpt2' has no group spec",
         "supported: gemma, gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"),
    ),
    # data files
    "calib_ints_column": (
        lambda t, m: [f"calibration.source={_parquet(t / 'ints.parquet', text=list(range(40)))}"],
        ("calibration.source: column 'text' of", "ints.parquet", "holds int64, not text"),
    ),
    "calib_binary_txt": (
        lambda t, m: [f"calibration.source={_write(t / 'blob.txt', b'abc' + bytes(range(128, 256)) * 8)}"],
        ("calibration.source:", "blob.txt", "is not UTF-8 text (binary data at byte 3)"),
    ),
    "calib_nul_bytes_txt": (
        lambda t, m: [f"calibration.source={_write(t / 'nul.txt', b'hello' + bytes(100))}"],
        ("calibration.source:", "nul.txt", "is not UTF-8 text (binary data at byte 5)"),
    ),
    "calib_binary_jsonl": (
        lambda t, m: [f"calibration.source={_write(t / 'blob.jsonl', bytes(range(256)))}"],
        ("calibration.source:", "blob.jsonl", "is not UTF-8 text"),
    ),
    "calib_empty_txt": (
        lambda t, m: [f"calibration.source={_write(t / 'empty.txt', b'')}"],
        ("calibration.source:", "empty.txt", "contains no text"),
    ),
    "calib_empty_dir": (
        lambda t, m: [f"calibration.source={_mkdir(t / 'nodata')}"],
        ("calibration.source: directory", "nodata", "holds no .parquet/.jsonl/.txt files"),
    ),
    "calib_unsupported_suffix": (
        lambda t, m: [f"calibration.source={_write(t / 'data.csv', b'text,hello')}"],
        ("calibration.source:", "data.csv", "has unsupported suffix"),
    ),
    "eval_seq_len_over_max": (
        lambda t, m: ["eval.enabled=true", f"eval.source={_parquet(t / 'e.parquet', text=['a b c'] * 4)}",
                      "eval.seq_len=512"],
        ("eval.seq_len: 512 exceeds the model's maximum of 256",),
    ),
    "eval_missing_source": (
        lambda t, m: ["eval.enabled=true", "eval.seq_len=32", f"eval.source={t}/none.parquet"],
        ("eval.source: file", "none.parquet", "does not exist"),
    ),
    "eval_ints_column": (
        lambda t, m: ["eval.enabled=true", "eval.seq_len=32",
                      f"eval.source={_parquet(t / 'ei.parquet', text=[1, 2, 3])}"],
        ("eval.source: column 'text' of", "ei.parquet", "holds int64"),
    ),
    # outputs
    "existing_output_is_a_file": (
        lambda t, m: [f"output.dir={_write(t / 'taken', b'keep')}"], ("output.dir:", "taken", "already exists")),
    "nested_output_dirs_not_left_behind": (
        lambda t, m: [f"output.dir={t}/new/deeper/run", f"model.source={m['truncated']}"],
        ("model.source: cannot load",),
    ),
}


def _mkmodel(path: Path, config: bytes) -> Path:
    path.mkdir()
    (path / "config.json").write_bytes(config)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.md").write_text("not data")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_naming_it(case, tmp_path, corpus_parquet, models, capsys):
    build, expected = CASES[case]
    extra = build(tmp_path, models)
    config = [extra.pop(0)] if extra and "=" not in extra[0] else []
    argv = ["prune", *config, *tiny_overrides(tmp_path / "out", corpus_parquet), *extra]
    before = _listing(tmp_path)
    code, err = _run(capsys, argv)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("rayprune: error:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err
    assert _listing(tmp_path) == before  # nothing half-written, no temp or parent dirs left


PLAN_CASES = {
    "model_config_not_json": (["--model-config", "{bad"], "--model-config: '{path}' is not valid JSON"),
    "model_config_not_object": (["--model-config", "[1, 2]"], "--model-config: '{path}' must hold a JSON object"),
    "model_dir_config_not_json": (["model.source={dir}"], "model.source: cannot read the model config of '{dir}'"),
    "model_dir_without_model_type": (["model.source={dir}", '{"hidden_size": 4}'],
                                     "should have a `model_type` key"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_bad_model_config(case, tmp_path, capsys):
    argv, expected = PLAN_CASES[case]
    path, mdir = tmp_path / "cfg.json", tmp_path / "model"
    mdir.mkdir()
    if argv[0] == "--model-config":
        path.write_text(argv[1])
        argv = ["--model-config", str(path)]
    else:
        (mdir / "config.json").write_text(argv[1] if len(argv) > 1 else "{garbage")
        argv = [argv[0].format(dir=mdir)]
    code, err = _run(capsys, ["plan", *argv])
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("rayprune: error:")]
    assert len(lines) == 1 and expected.format(path=path, dir=mdir).lower() in lines[0].lower(), err


def test_unwritable_output_dir_non_root(tmp_path, corpus_parquet, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        before = _listing(tmp_path)
        code, err = _run(capsys, ["prune", *tiny_overrides(locked / "run", corpus_parquet)])
        assert code == 2 and f"output.dir: '{locked}' is not writable" in err, err
        assert _listing(tmp_path) == before
    finally:
        locked.chmod(0o700)


def test_unwritable_output_dir_even_for_root(corpus_parquet, capsys):
    """``/sys`` refuses new directories for every user (``os.access`` says yes to root)."""
    target = Path("/sys/rayprune-run")
    if not Path("/sys").is_dir() or not os.access("/sys", os.W_OK):
        pytest.skip("needs a writable-looking /sys (Linux, root)")
    before = sorted(os.listdir("/sys"))
    code, err = _run(capsys, ["prune", *tiny_overrides(target, corpus_parquet)])
    assert code == 2, err
    assert "output.dir: cannot write into '/sys'" in err, err
    assert sorted(os.listdir("/sys")) == before


# ------------------------------------------------------------- below the CLI

def _tiny():
    return build_tiny_llama(TinyModelConfig(**TINY))


def test_check_vocab_uses_the_embedding_rows():
    """A config that claims 257 entries but an embedding with 200 rows: ids 200..256 are refused."""
    model = _tiny()
    model.model.embed_tokens = nn.Embedding(200, TINY["hidden"])
    check_vocab(torch.tensor([0, 199]), model, "calibration.source")
    with pytest.raises(UsageError, match=r"^calibration\.source: tokenizer produced id 256 but the model's "
                                         r"vocabulary has 200 entries$"):
        check_vocab(torch.tensor([5, 256, 7]), model, "calibration.source")
    with pytest.raises(UsageError, match="id -1"):
        check_vocab(torch.tensor([-1, 3]), model, "eval.source")


def test_vocab_mismatch_rejected_before_any_forward(corpus_parquet):
    """Self-generated calibration with a too-big tokenizer must fail before the model runs."""
    model = _tiny()

    def no_forward(*args, **kwargs):
        raise AssertionError("forward ran before the vocabulary check")

    model.forward = no_forward
    tok = byte_tokenizer()
    tok.add_tokens(["quick"])
    for source in ("generate", str(corpus_parquet)):
        cfg = RunConfig()
        cfg.calibration.source, cfg.calibration.num_samples, cfg.calibration.seq_len = source, 2, 8
        with pytest.raises(UsageError, match=r"^model\.source: tokenizer of .* has 258 tokens but the model's "
                                             r"vocabulary has 257 entries"):
            calibration_windows(cfg, "unused", tok, model)


def test_structured_missing_projection_is_named():
    model = _tiny()
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(UsageError, match=r"^structured\.enabled: projection model\.layers\.0\.mlp\.gate_proj is "
                                         r"missing or not a Linear \(found nothing\)$"):
        module_groups(model)
    model = _tiny()
    model.model.layers[1].self_attn.k_proj = nn.Identity()
    with pytest.raises(UsageError, match=r"model\.layers\.1\.self_attn\.k_proj .*\(found Identity\)"):
        module_groups(model)
