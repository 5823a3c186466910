"""Peer row: ALPS (Meng et al. 2024, github.com/mazumder-lab/ALPS) pruning SmolLM2 block by block, on this CPU.

Runs the published ``ALPS_prune`` class (its ADMM support search with its penalty schedule, then its
preconditioned-CG refit, default settings: ``rho=0.1``, 300 iterations at most) from a checkout given by
``--alps`` (never part of this repository), driven block-sequentially as its ``llama.py`` does: every linear
of a block gets ``X^T X`` from one pass over the block's inputs, all are pruned, then the pruned block's
outputs feed the next block. ALPS hard-codes ``cuda:0``; here that device is mapped to the CPU (tensor moves
and synchronisation only: no arithmetic changes). Writes the pruned weights (safetensors) and prints one JSON
line ``{"prune_s", "version"}``.

Example:
    python tests/benchmarks/peer_alps.py --alps ../alps --model MODEL_DIR --calib calib.pt --pattern 2:4 --out w.st
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch


def _cpu_for_cuda() -> None:
    """Send ALPS's ``.to('cuda:0')`` and ``torch.cuda.synchronize()`` / ``empty_cache()`` to the CPU."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None


def _load_alps(root: Path):
    spec = importlib.util.spec_from_file_location("alps_peer", root / "alps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.dev = "cpu"
    return module


def main() -> None:
    """Prune with ALPS and write the weights."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alps", required=True, help="a checkout of mazumder-lab/ALPS")
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="torch.save'd (N, L) calibration ids")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from orchestrator.engine.blocks import block_linears, capture_block_inputs, decoder_blocks, forward_all

    torch.set_num_threads(args.threads)
    _cpu_for_cuda()
    alps = _load_alps(Path(args.alps))
    commit = Path(args.alps, "COMMIT")
    version = commit.read_text().strip() if commit.is_file() else "unknown"
    nm_n, nm_m = (0, 0) if args.pattern == "unstructured" else map(int, args.pattern.split(":"))
    sparsity = args.sparsity if not nm_m else nm_n / nm_m
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    calib = torch.load(args.calib, weights_only=True)
    n, seq = calib.shape
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden, kwargs = capture_block_inputs(model, calib)
        for block in decoder_blocks(model):
            linears = block_linears(block)
            solvers = {name: alps.ALPS_prune(lin, nsamples=n, seqlen=seq) for name, lin in linears.items()}
            hooks = [lin.register_forward_hook(lambda _m, i, o, s=solvers[name]: s.add_batch(i[0].data, o.data))
                     for name, lin in linears.items()]
            forward_all(block, hidden, kwargs)
            for h in hooks:
                h.remove()
            for solver in solvers.values():
                solver.ALPS_admm(sp=sparsity, nm_n=nm_n, nm_m=nm_m, rho=0.1)
                solver.free()
            hidden = forward_all(block, hidden, kwargs)
    prune_s = time.perf_counter() - t0
    prefix = {id(m): name for name, m in model.named_modules()}
    weights = {f"{prefix[id(lin)]}.weight": lin.weight.data.contiguous()
               for block in decoder_blocks(model) for lin in block_linears(block).values()}
    save_file(weights, args.out)
    print(json.dumps({"prune_s": prune_s, "version": f"ALPS {version[:7]}"}))  # noqa: T201 - the peer's result


if __name__ == "__main__":
    main()
