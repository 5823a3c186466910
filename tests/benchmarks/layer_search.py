"""Mask search on single layers: SparseGPT's mask, the ADMM search, swap moves and the damping, side by side.

The SmolLM2 protocol's calibration windows (Python docs) feed one dense block; each probed linear's inputs
are split into a fit set (the first ``--fit`` windows) and a held-out set (the rest). Every variant's
output error ``||X (W - W0)^T||^2`` is reported on both, relative to SparseGPT's mask with its kept weights
re-solved (10 CG iterations, damping 0.01): below 1 is better. Prints a table and writes JSON.

Example:
    python tests/benchmarks/layer_search.py --out bench-out/layer-search.json --block 5
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from orchestrator.inputs.data import calibration_windows
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import load_model, load_tokenizer, materialize
from orchestrator.pruning.admm import AdmmSettings, admm_mask
from orchestrator.pruning.reconstruct import output_error, reconstruct_cg
from orchestrator.pruning.sparsegpt import sparsegpt_prune
from orchestrator.pruning.swaps import refine_swaps

log = logging.getLogger("bench.layer_search")
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def layer_inputs(block: int, windows: int, data: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> ((tokens, in) inputs, (out, in) dense weight)`` of the probed linears of dense block ``block``."""
    cfg = load_config(None, ["model.source=smollm2-135m", f"calibration.source={data}/calib-python-docs.parquet",
                             f"calibration.num_samples={windows}", "calibration.seq_len=512", "calibration.seed=0",
                             "backend.kind=local"])
    path = materialize(cfg.model)
    model = load_model(path, cfg.model)
    ids = calibration_windows(cfg, path, load_tokenizer(path, cfg.model), model)
    layer = model.model.layers[block]
    caught: dict[str, list[torch.Tensor]] = {n: [] for n in LINEARS}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda _m, i, _o, n=n: caught[n].append(i[0].detach().reshape(-1, i[0].shape[-1]).float())) for n in LINEARS]
    with torch.no_grad():
        for i in range(0, ids.shape[0], 4):
            model(ids[i:i + 4])
    for h in hooks:
        h.remove()
    return {n: (torch.cat(caught[n]), layer.get_submodule(n).weight.detach().float()) for n in LINEARS}


def variants(name: str, w: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, nm: tuple[int, int] | None
             ) -> list[dict]:
    """Every variant on one linear and pattern, relative to SparseGPT's mask re-solved (fit and held-out error)."""
    _, start = sparsegpt_prune(w, fit, 0.5, nm)
    base = reconstruct_cg(w, start, fit, 0.01, 10)
    ref = output_error(base, w, fit), output_error(base, w, held)
    rows = []

    def row(variant: str, weight: torch.Tensor, seconds: float) -> None:
        rows.append({"linear": name, "pattern": "2:4" if nm else "unstructured", "variant": variant,
                     "fit": output_error(weight, w, fit) / ref[0], "held_out": output_error(weight, w, held) / ref[1],
                     "seconds": round(seconds, 3)})
        log.info("%s", rows[-1])

    row("sparsegpt + lstsq (reference)", base, 0.0)
    for rounds in (10, 50):
        t0 = time.perf_counter()
        moved = refine_swaps(base, w, start, fit, nm, rounds)
        row(f"sparsegpt + {rounds} swap rounds + lstsq", reconstruct_cg(w, moved.mask, fit, 0.01, 10),
            time.perf_counter() - t0)
    for search_damp in (0.01, 0.03, 0.1):
        t0 = time.perf_counter()
        found = admm_mask(w, fit.double(), 0.5, nm, init_mask=start, settings=AdmmSettings(percdamp=search_damp))
        seconds = time.perf_counter() - t0
        for lstsq_damp in (0.01, 0.1):
            row(f"admm (damp {search_damp}) + lstsq (damp {lstsq_damp}), {found.iters} it",
                reconstruct_cg(w, found.mask, fit, lstsq_damp, 10), seconds)
    found = admm_mask(w, fit.double(), 0.5, nm)
    row(f"admm from the normalised magnitude + lstsq, {found.iters} it", reconstruct_cg(w, found.mask, fit, 0.01, 10),
        0.0)
    return rows


def main() -> None:
    """Run every variant on every probed linear, at 50% and 2:4."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--windows", type=int, default=24, help="calibration windows captured")
    ap.add_argument("--fit", type=int, default=16, help="of them, the windows the variants fit on")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for name, (x, w) in layer_inputs(args.block, args.windows, args.data).items():
        n_fit = args.fit * 512
        fit = (x[:n_fit].double().T @ x[:n_fit].double()).float()  # (in, in)
        held = (x[n_fit:].double().T @ x[n_fit:].double()).float()
        for nm in (None, (2, 4)):
            rows += variants(name, w, fit, held, nm)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"block": args.block, "fit_windows": args.fit, "rows": rows}, indent=2) + "\n")
    lines = [f"{'linear':<18} {'pattern':<13} {'variant':<58} {'fit':>7} {'held-out':>8} {'s':>6}"]
    lines += [f"{r['linear']:<18} {r['pattern']:<13} {r['variant']:<58} {r['fit']:>7.4f} {r['held_out']:>8.4f} "
              f"{r['seconds']:>6.2f}" for r in rows]
    print("\n".join(lines))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
