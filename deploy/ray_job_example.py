"""A Ray Job that prunes through the Python API (``ray job submit -- python deploy/ray_job_example.py``).

The driver joins the job's cluster (``backend.address: auto``), prunes Llama-2-13B with the cluster's GPUs as
``configs/llama2-13b.yaml`` says, with a few settings changed in code, and prints the result line (run
directory, sparsity, perplexities) as the job's last stdout line::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python deploy/ray_job_example.py --sparsity 0.6 --out /data/runs/llama2-13b-60
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from orchestrator import prune


def main() -> int:
    """Parse the job's arguments, prune, print the result line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/llama2-13b.yaml")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--out", default="/data/runs/llama2-13b-api")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = prune(args.config, pruning={"sparsity": args.sparsity}, backend={"address": "auto"},
                   output={"dir": args.out}, progress=False)
    logging.info("model card: %s", result.model_dir / "README.md")
    sys.stdout.write(json.dumps(result.summary()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
