"""One llm-compressor pruning run for the quality benchmark's peer rows (runs in its own process and venv).

llm-compressor pins an older transformers than rayprune, so ``quality.py`` runs this script with the
peer environment's Python (``make peer-venv`` builds ``.venv-peer``). It reads the dense Hugging
Face checkpoint and the benchmark's calibration windows, prunes with ``oneshot`` and a
``WandaPruningModifier`` / ``SparseGPTModifier`` (``lm_head`` ignored, as BENCHMARK.md), and writes
the pruned linear weights as safetensors plus a JSON line with the pruning time; ``quality.py``
evaluates them with the same evaluation as its own rows.

Usage (by quality.py)::

    .venv-peer/bin/python tests/benchmarks/peer_llmcompressor.py --model DIR --calib ids.pt \\
        --method sparsegpt --pattern 2:4 --sparsity 0.5 [--owl] --out weights.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main() -> int:
    """Prune once and print ``{"prune_s": ..., "version": ...}`` as the last stdout line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="dense Hugging Face checkpoint directory")
    ap.add_argument("--calib", required=True, help="torch file with the (N, L) int64 calibration windows")
    ap.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    ap.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--owl", action="store_true", help="llm-compressor's OWL sparsity profile (M 5, lambda 0.08)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="safetensors file for the pruned linear weights")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = torch.load(args.calib, weights_only=True)  # (N, L)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kind = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    extra = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if args.owl else {}  # OWL's defaults
    recipe = kind(sparsity=args.sparsity, mask_structure="0:0" if args.pattern == "unstructured" else args.pattern,
                  targets=["Linear"], ignore=["lm_head"], **extra)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    prune_s = time.perf_counter() - t0
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters()
               if n.endswith(".weight") and p.dim() == 2 and "embed" not in n and "lm_head" not in n}
    save_file(weights, args.out)
    sys.stdout.write(json.dumps({"prune_s": prune_s, "version": llmcompressor.__version__}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
