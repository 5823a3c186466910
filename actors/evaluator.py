"""Evaluation actors: perplexity windows and multiple-choice examples split across workers.

Each :class:`EvalWorker` holds one model at a time (a checkpoint directory, optionally with
weights from the object store laid over it, e.g. the coordinator's freshly pruned linears).
:class:`EvalGroup` splits the work, and the coordinator-side reductions are exact: perplexity
adds per-window NLL sums, accuracy concatenates per-example results in order. Several
candidates (a sweep) are spread over the actors, one whole candidate per actor at a time.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class ModelRef:
    """A model an evaluation actor can load.

    Attributes:
        path: materialised model directory readable by the actors.
        weights: optional object ref of ``{full weight name: tensor}`` copied over the loaded weights.
        key: cache key (a worker reloads only when the key changes).
    """

    path: str
    weights: Any = None
    key: str = ""


class EvalWorker:
    """One evaluation actor (a GPU when the cluster has them, a CPU otherwise)."""

    def __init__(self, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.key: str | None = None
        self.model = None
        self.tokenizer = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def load(self, ref: ModelRef, model_cfg: Any, weights: dict[str, torch.Tensor] | None = None) -> int:
        """Load ``ref`` (no-op when already loaded); returns the parameter count."""
        from orchestrator.modeling import load_model, load_tokenizer

        if self.key == ref.key and self.model is not None:
            return sum(p.numel() for p in self.model.parameters())
        self.model = None
        self.model = load_model(ref.path, model_cfg).to(self.device)
        if weights:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, w in weights.items():
                    params[name].copy_(w.to(params[name].dtype))
        self.tokenizer = load_tokenizer(ref.path, model_cfg)
        self.key = ref.key
        return sum(p.numel() for p in self.model.parameters())

    def nll(self, windows: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL of ``(k, L)`` windows and the number of predicted tokens."""
        from orchestrator.evaluate import window_nll

        return window_nll(self.model, windows.to(self.device))

    def mc(self, examples: list[dict]) -> list[dict]:
        """Per-example multiple-choice results (see :func:`orchestrator.zeroshot.score_examples`)."""
        from orchestrator.zeroshot import score_examples

        return score_examples(self.model, self.tokenizer, examples)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal ``[lo, hi)`` ranges covering ``range(n)`` (empty ranges dropped)."""
    per, extra = divmod(n, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + per + (1 if r < extra else 0)
        if hi > lo:
            out.append((lo, hi))
        lo = hi
    return out


class EvalGroup:
    """``workers`` evaluation actors.

    Args:
        workers: number of actors (one GPU each when the cluster has GPUs).
        model_cfg: model options used to load every checkpoint (dtype, trust_remote_code, ...).
        address: Ray address (None: the running or a local Ray).
        num_threads: torch threads per actor (0: CPUs // workers).
        progress: show progress bars on the driver.
    """

    def __init__(self, workers: int, model_cfg: Any, address: str | None = None, num_threads: int = 0,
                 progress: bool = False) -> None:
        import ray

        from actors.group import ensure_ray
        from orchestrator.errors import UsageError

        ensure_ray(address)
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        have = gpus if gpus else int(res.get("CPU", 0))
        if workers < 1 or workers > have:
            kind = "GPUs" if gpus else "CPUs"
            raise UsageError(f"eval.workers: {workers} actors asked but the Ray cluster has {have} {kind}")
        threads = num_threads or max(1, (os.cpu_count() or 1) // workers)
        cls = ray.remote(EvalWorker)
        env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.actors = [cls.options(num_cpus=1, num_gpus=1 if gpus else 0, runtime_env={"env_vars": env},
                                   scheduling_strategy="SPREAD").remote(threads) for _ in range(workers)]
        self.model_cfg = model_cfg
        self.workers = workers
        self.progress = progress

    def _load(self, actors: list, ref: ModelRef) -> None:
        import ray

        ray.get([a.load.remote(ref, self.model_cfg, ref.weights) for a in actors])

    def _run(self, method: str, items, desc: str) -> list:
        """Split ``items`` into ~4 contiguous pieces per actor, run them, return the pieces' results in order."""
        import ray
        from tqdm.auto import tqdm

        ranges = split(len(items), self.workers * 4)
        refs = [getattr(self.actors[i % self.workers], method).remote(items[lo:hi])
                for i, (lo, hi) in enumerate(ranges)]
        index = {r: i for i, r in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(items), desc=desc, disable=not self.progress, unit="item") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = index[done[0]]
                results[i] = ray.get(done[0])
                bar.update(ranges[i][1] - ranges[i][0])
        return results

    def perplexity(self, ref: ModelRef, windows: torch.Tensor) -> float:
        """Perplexity of ``(K, L)`` windows, split contiguously across the actors."""
        self._load(self.actors, ref)
        sums = self._run("nll", windows, f"perplexity {ref.key} (x{self.workers} actors)")
        total = sum(s for s, _ in sums)
        tokens = sum(t for _, t in sums)
        return math.exp(total / max(tokens, 1))

    def multiple_choice(self, ref: ModelRef, examples: list[dict]) -> list[dict]:
        """Per-example results in the original order, examples split across the actors."""
        self._load(self.actors, ref)
        parts = self._run("mc", examples, f"zero-shot {ref.key} (x{self.workers} actors)")
        return [r for part in parts for r in part]

    def candidates(self, refs: list[ModelRef], windows: torch.Tensor | None,
                   tasks: dict[str, list[dict]] | None = None) -> list[dict]:
        """Evaluate several models in parallel: whole candidates round-robin over the actors.

        Returns:
            one ``{"ppl": float | None, "zeroshot": {task: aggregate}}`` per ref, in order.
        """
        import ray

        from orchestrator.zeroshot import aggregate

        if len(refs) < self.workers:  # fewer candidates than actors: split each one's work instead
            out = []
            for ref in refs:
                ppl = self.perplexity(ref, windows) if windows is not None else None
                zs = {t: aggregate(self.multiple_choice(ref, ex)) for t, ex in (tasks or {}).items()}
                out.append({"ppl": ppl, "zeroshot": zs})
            return out
        pending: dict[int, dict] = {i: {"ppl": None, "zeroshot": {}} for i in range(len(refs))}
        for start in range(0, len(refs), self.workers):
            wave = list(enumerate(refs))[start : start + self.workers]
            ray.get([self.actors[j].load.remote(ref, self.model_cfg, ref.weights) for j, (_, ref) in enumerate(wave)])
            jobs = []
            for j, (i, _) in enumerate(wave):
                a = self.actors[j]
                if windows is not None:
                    jobs.append((i, "ppl", a.nll.remote(windows)))
                for t, ex in (tasks or {}).items():
                    jobs.append((i, t, a.mc.remote(ex)))
            for i, what, ref in jobs:
                val = ray.get(ref)
                if what == "ppl":
                    pending[i]["ppl"] = math.exp(val[0] / max(val[1], 1))
                else:
                    pending[i]["zeroshot"][what] = aggregate(val)
        return [pending[i] for i in range(len(refs))]

    def shutdown(self) -> None:
        """Kill the actors."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
