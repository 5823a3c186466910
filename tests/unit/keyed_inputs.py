"""What the run-key and fingerprint tests share: configs over given inputs, small model and data
directories (``calib``/``model_dir`` are fixtures: see ``tests/unit/conftest.py``), and a hub that
must not be asked."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.inputs.loader import config_from_dict


def no_hub(repo: str, revision: str | None, kind: str) -> str | None:
    """A hub resolver for tests that must not look anything up."""
    raise AssertionError(f"unexpected hub lookup of {kind} {repo}@{revision}")


def cfg_for(calib: Path | str = "generate", model: str = "tiny", **overrides: object):
    """A local-run config over ``calib`` and ``model`` with ``dotted.key=value`` overrides."""
    items = {"model.source": model, "calibration.source": str(calib), "eval.enabled": False,
             "backend.kind": "local", "output.dir": "runs/x", **overrides}
    return config_from_dict({}, [f"{k}={v}" for k, v in items.items()])


def write_calib(tmp_path: Path) -> Path:
    """A 20-document JSONL calibration file."""
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} about loops"}) + "\n" for i in range(20)))
    return path


def write_model_dir(tmp_path: Path) -> Path:
    """A model directory with a config, a 4 KiB safetensors file and a tokenizer."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(b"\x01" * 4096)
    (d / "tokenizer.json").write_text("{}")
    return d


def heavy_modules_after_import(module: str) -> list[str]:
    """Which of ray, torch, deepspeed a fresh interpreter has loaded after importing ``module``."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().replace("'", '"'))
