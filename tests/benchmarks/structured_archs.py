"""Structured (SAAP) runs on seeded tiny random models of the architectures people prune today.

For each architecture (LLaMA, Qwen3, Gemma 2, Gemma 3, Phi-3) a random model of a few million parameters
with the byte tokenizer is written to a directory, pruned through the CLI (`rayprune prune`,
structured, adaptive, 30% of decoder parameters), and its per-layer checkpoint reloaded with plain
transformers (`trust_remote_code=True`) in a process that cannot import rayprune; its logits must
equal rayprune's loader's. Prints a table and writes JSON.

    python tests/benchmarks/structured_archs.py --out bench-out/structured-archs.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.unit.test_structured_portable import PLAIN_LOAD  # noqa: E402

log = logging.getLogger("bench.structured_archs")
SHAPE = dict(vocab_size=257, hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)


def make(arch: str, out: Path) -> Path:
    import transformers as tf

    from orchestrator.inputs.models import byte_tokenizer

    torch.manual_seed(0)
    cfg, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
                "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
                "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM)}[arch]
    extra = {"sliding_window": 64} if arch.startswith("gemma") else {}
    shape = {k: v for k, v in SHAPE.items() if not (arch == "phi3" and k == "head_dim")}
    model = cls(cfg(**shape, **extra, eos_token_id=256, pad_token_id=256, bos_token_id=256))
    model.save_pretrained(out / arch)
    byte_tokenizer().save_pretrained(out / arch)
    return out / arch


def run(arch: str, work: Path) -> dict:
    from orchestrator.structured.shrink import load_structured

    src = make(arch, work)
    run_dir = work / f"run-{arch}"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "orchestrator.surfaces.cli", "-q", "prune", "configs/saap.yaml",
           f"model.source={src}", "structured.target=0.3", "structured.round_to=4", "structured.minibatches=2",
           "structured.recovery.enabled=false", "calibration.num_samples=8", "calibration.seq_len=128",
           "eval.num_windows=8", "eval.seq_len=128", f"output.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"arch": arch, "ok": False, "error": proc.stderr.strip().splitlines()[-1][:300]}
    seconds = time.perf_counter() - t0
    report = json.loads((run_dir / "report.json").read_text())
    st = report["structured"]
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(run_dir / "model"), json.dumps(ids.tolist())],
                           cwd=work, capture_output=True, text=True, timeout=300,
                           env={"PATH": "/usr/bin:/bin", "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in plain.stdout.splitlines() if ln.startswith("LOGITS ")]
    with torch.no_grad():
        ours = load_structured(run_dir / "model")(ids).logits
    same = bool(lines) and torch.equal(torch.tensor(json.loads(lines[0][7:])), ours)
    sizes = st["layer_sizes"]
    return {"arch": arch, "model_type": json.loads((run_dir / "model" / "config.json").read_text())["model_type"],
            "params_before": st["parameters_before"], "params_after": st["parameters_after"],
            "removed": st["removed_fraction"], "dense_ppl": report["metrics"].get("dense_ppl"),
            "pruned_ppl": report["metrics"].get("pruned_ppl"), "uniform": st["uniform_sizes"],
            "kv_heads": [s["kv_heads"] for s in sizes], "intermediate": [s["intermediate"] for s in sizes],
            "plain_transformers_logits_equal": same, "seconds": round(seconds, 1), "ok": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/structured-archs.json")
    ap.add_argument("--archs", default="llama,qwen3,gemma2,gemma3,phi3")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(a, Path(tmp)) for a in args.archs.split(",")]
    log.info("%-7s %-12s %10s %10s %8s %9s %9s %-16s %-22s %s", "arch", "model_type", "params", "after",
             "removed", "dense ppl", "ppl", "kv heads", "intermediate", "plain load")
    for r in rows:
        if "error" in r:
            log.info("%-7s FAILED %s", r["arch"], r["error"])
            continue
        log.info("%-7s %-12s %10d %10d %7.1f%% %9.2f %9.2f %-16s %-22s %s", r["arch"], r["model_type"],
                 r["params_before"], r["params_after"], 100 * r["removed"], r["dense_ppl"], r["pruned_ppl"],
                 r["kv_heads"], r["intermediate"], r["plain_transformers_logits_equal"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
