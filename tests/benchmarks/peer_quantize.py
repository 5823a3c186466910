"""One quantization of the hand-off benchmark, in llm-compressor's own process and venv (``make peer-venv``).

Loads a checkpoint (dense, or the ``model/`` of a rayprune run), applies a ``rayprune export`` recipe with
``oneshot`` (no recipe: as it is), and prints one JSON line: the perplexity on the given windows
(``exp(sum NLL / tokens)``, the quantized forward as llm-compressor runs it), and the fraction of zeros of the
decoder linears' effective weights (the quantized values, ``lm_head`` excluded) with the oneshot time.

    .venv-peer/bin/python tests/benchmarks/peer_quantize.py --model DIR --eval ids.pt [--recipe R.yaml]
        [--calib calib.pt]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def main() -> int:
    """Quantize (optionally) and measure; the JSON is the last stdout line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval", required=True, help="torch file with the (K, L) int64 evaluation windows")
    ap.add_argument("--recipe", help="llm-compressor recipe YAML (none: the model as it is)")
    ap.add_argument("--calib", help="torch file with (N, L) calibration windows (GPTQ)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    seconds = 0.0
    if args.recipe:
        from llmcompressor import oneshot

        kw = {}
        if args.calib:
            from datasets import Dataset

            ids = torch.load(args.calib, weights_only=True)
            kw = dict(dataset=Dataset.from_dict({"input_ids": ids.tolist(),
                                                 "attention_mask": torch.ones_like(ids).tolist()}),
                      num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
                      shuffle_calibration_samples=False, pipeline="sequential")
        t0 = time.perf_counter()
        oneshot(model=model, recipe=args.recipe, **kw)
        seconds = time.perf_counter() - t0
    zeros = total = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear) or "lm_head" in name:
                continue
            w = m.weight
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(m, "weight_scale"):
                from compressed_tensors.quantization.lifecycle.forward import fake_quantize

                w = fake_quantize(w, m.weight_scale, getattr(m, "weight_zero_point", None), scheme.weights)
            zeros += int((w == 0).sum())
            total += w.numel()
        windows = torch.load(args.eval, weights_only=True)
        nll = 0.0
        tokens = 0
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1]
            logits = model(ids).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="sum"))
            tokens += ids.shape[1] - 1
    sys.stdout.write(json.dumps({"ppl": math.exp(nll / tokens), "linear_zeros": zeros / total,
                                 "quantize_s": round(seconds, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
