"""Bad input through the CLI: one clear line naming the field, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.surfaces.cli import main
from tests.conftest import tiny_overrides


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(["-q", *argv])
    return code, capsys.readouterr().err


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _bad_inputs(tmp: Path, calib: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv after 'prune', substring the error line must contain)."""
    out = tmp / "out"
    base = tiny_overrides(out, calib)
    (tmp / "bad.yaml").write_text("model:\n  source: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "fake.gguf").write_bytes(b"this is not a gguf file at all")
    corrupt = tmp / "corrupt-model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, '
                                         '"num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 257}')
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 20)
    empty = tmp / "empty.parquet"
    pq.write_table(pa.table({"text": ["", "   "]}), empty)
    nocol = tmp / "nocol.parquet"
    pq.write_table(pa.table({"body": ["some text here"]}), nocol)
    a_file = tmp / "a-file"
    a_file.write_text("x")
    return {
        "malformed_yaml": ([str(tmp / "bad.yaml"), *base], "not valid YAML"),
        "yaml_not_mapping": ([str(tmp / "list.yaml"), *base], "must hold a mapping"),
        "missing_config": ([str(tmp / "nope.yaml"), *base], "does not exist"),
        "unknown_key": ([*base, "pruning.sparsty=0.5"], "pruning.sparsty: unknown key"),
        "unknown_method": ([*base, "pruning.method=obs"], "pruning.method: 'obs'"),
        "sparsity_high": ([*base, "pruning.sparsity=1.5"], "pruning.sparsity: must be in (0, 1)"),
        "sparsity_zero": ([*base, "pruning.sparsity=0"], "pruning.sparsity: must be in (0, 1)"),
        "nm_mismatch": ([*base, "pruning.pattern=2:4", "pruning.sparsity=0.7"], "contradicts pattern 2:4"),
        "nm_n_ge_m": ([*base, "pruning.pattern=4:2"], "needs N < M"),
        "zero_samples": ([*base, "calibration.num_samples=0"], "calibration.num_samples: must be > 0"),
        "negative_samples": ([*base, "calibration.num_samples=-3"], "calibration.num_samples: must be > 0"),
        "wrong_type": ([*base, "calibration.seq_len=long"], "calibration.seq_len: expected int"),
        "bad_override": ([*base, "=5"], "override '=5'"),
        "unknown_backend": ([*base, "backend.kind=slurm"], "backend.kind: 'slurm'"),
        "seq_len_over_max": ([*base, "calibration.seq_len=512"], "exceeds the model's maximum of 256"),
        "missing_model_path": ([*base, f"model.source={tmp}/no-such-model"], "model.source"),
        "gguf_not_a_model": ([*base, f"model.source={tmp}/fake.gguf"], "not a loadable GGUF model"),
        "corrupt_safetensors": ([*base, f"model.source={corrupt}"], "cannot load"),
        "missing_calibration": ([*base, f"calibration.source={tmp}/none.parquet"], "does not exist"),
        "empty_calibration": ([*base, f"calibration.source={empty}"], "contains no text"),
        "missing_column": ([*base, f"calibration.source={nocol}"], "has no column 'text'"),
        "too_few_windows": ([*base, "calibration.num_samples=100000"], "fewer than 100000 requested"),
        "output_parent_is_file": ([*base, f"output.dir={a_file}/run"], "output.dir"),
    }


CASES = [
    "malformed_yaml", "yaml_not_mapping", "missing_config", "unknown_key", "unknown_method", "sparsity_high",
    "sparsity_zero", "nm_mismatch", "nm_n_ge_m", "zero_samples", "negative_samples", "wrong_type", "bad_override",
    "unknown_backend", "seq_len_over_max", "missing_model_path", "gguf_not_a_model", "corrupt_safetensors",
    "missing_calibration", "empty_calibration", "missing_column", "too_few_windows", "output_parent_is_file",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, corpus_parquet, capsys):
    argv, expected = _bad_inputs(tmp_path, corpus_parquet)[case]
    before = _listing(tmp_path)
    code, err = _run(capsys, ["prune", *argv])
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("rayprune: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert _listing(tmp_path) == before  # nothing half-written, no temp dirs left


def test_all_config_problems_reported_together(tmp_path, corpus_parquet, capsys):
    argv = [*tiny_overrides(tmp_path / "o", corpus_parquet), "pruning.method=nope", "pruning.sparsity=2",
            "calibration.num_samples=0"]
    code, err = _run(capsys, ["prune", *argv])
    assert code == 2
    for field in ("pruning.method", "pruning.sparsity", "calibration.num_samples"):
        assert field in err


def test_existing_output_is_not_overwritten(tmp_path, corpus_parquet, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run(capsys, ["prune", *tiny_overrides(out, corpus_parquet)])
    assert code == 2 and "already exists" in err and "output.overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_console_script_exit_code_and_help(tmp_path):
    res = subprocess.run([sys.executable, "-m", "orchestrator.surfaces.cli", "prune", "pruning.method=bogus",
                          f"output.dir={tmp_path}/x"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "pruning.method: 'bogus' is not one of" in res.stderr
    helped = subprocess.run([sys.executable, "-m", "orchestrator.surfaces.cli", "prune", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "KEY=VALUE" in helped.stdout and "examples:" in helped.stdout


@pytest.mark.parametrize("key", ["trust_remote_code", "allow_pickle"])
def test_resume_does_not_take_code_execution_from_the_checkpoint(capsys, tmp_path, key):
    """``--resume`` reads config.yaml from the checkpoint directory: a setting there that runs code must be
    confirmed on the command line (issue 30, finding 9); nothing is written."""
    import yaml

    from orchestrator.outputs.publish import checkpoint_path

    out = tmp_path / "out"
    ckpt = checkpoint_path(out)
    ckpt.mkdir(parents=True)
    (ckpt / "progress.json").write_text("{}")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": {"source": "tiny", key: True},
                                                      "backend": {"kind": "ray"}}))
    before = _listing(tmp_path)
    code, err = _run(capsys, ["prune", "--resume", str(out)])
    assert code == 2
    assert f"model.{key}: true" in err and f"model.{key}=true" in err and len(err.strip().splitlines()) == 1
    assert _listing(tmp_path) == before
