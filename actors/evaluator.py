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
from dataclasses import dataclass
from typing import Any

import torch

from actors.group import ActorGroup, GroupMember, GroupSpec

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


class EvalWorker(GroupMember):
    """One evaluation actor (its GPU when the cluster has them, a CPU otherwise); no process group."""

    def __init__(self, num_threads: int = 1) -> None:
        super().__init__(num_threads)
        self.key: str | None = None
        self.model = None
        self.tokenizer = None

    def load(self, ref: ModelRef, model_cfg: Any, weights: dict[str, torch.Tensor] | None = None) -> int:
        """Load ``ref`` (no-op when already loaded); returns the parameter count."""
        from orchestrator.inputs.models import load_tokenizer
        from orchestrator.structured.shrink import load_checkpoint

        if self.key == ref.key and self.model is not None:
            return sum(p.numel() for p in self.model.parameters())
        self.model = None
        self.model = load_checkpoint(ref.path, model_cfg).to(self.device)
        if weights:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, w in weights.items():
                    params[name].copy_(w.to(params[name].device, params[name].dtype))
        self.tokenizer = load_tokenizer(ref.path, model_cfg)
        self.key = ref.key
        return sum(p.numel() for p in self.model.parameters())

    def speed(self, paths: dict[str, str], model_cfg: Any, options: dict) -> dict:
        """Prefill/decode speed of the checkpoints ``paths`` (label -> directory) side by side on this actor."""
        from orchestrator.evaluation.speed import compare_speed
        from orchestrator.inputs.models import load_tokenizer
        from orchestrator.structured.shrink import load_checkpoint

        self.model = self.key = None  # one model at a time besides the ones measured
        models = {k: load_checkpoint(p, model_cfg).to(self.device) for k, p in paths.items()}
        return compare_speed(models, load_tokenizer(next(iter(paths.values())), model_cfg), **options)

    def nll(self, windows: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL of ``(k, L)`` windows and the number of predicted tokens."""
        from orchestrator.evaluation.perplexity import window_nll

        return window_nll(self.model, windows.to(self.device))  # a float and an int: nothing to move back

    def mc(self, examples: list[dict]) -> list[dict]:
        """Per-example multiple-choice results (see :func:`orchestrator.evaluation.zeroshot.score_examples`)."""
        from orchestrator.evaluation.zeroshot import score_examples

        return score_examples(self.model, self.tokenizer, examples)


def remote_speed(spec: GroupSpec, model_cfg: Any, paths: dict[str, str], options: dict) -> dict:
    """Prefill/decode speed of several checkpoints side by side on one evaluation actor of ``spec``
    (:func:`orchestrator.evaluation.speed.compare_speed`); the actor is stopped afterwards."""
    import ray

    group = ActorGroup(EvalWorker, spec)
    try:
        return ray.get(group.actors[0].speed.remote(paths, model_cfg, options))
    finally:
        group.shutdown()


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
    """``spec.workers`` evaluation actors (an :class:`~actors.group.ActorGroup` without a process group).

    Args:
        spec: the group (one GPU per actor on a GPU cluster), chosen by the coordinator.
        model_cfg: model options used to load every checkpoint (dtype, trust_remote_code, ...).
        progress: show progress bars on the driver.
    """

    def __init__(self, spec: GroupSpec, model_cfg: Any, progress: bool = False) -> None:
        self.group = ActorGroup(EvalWorker, spec)
        self.actors = self.group.actors
        self.model_cfg = model_cfg
        self.workers = spec.workers
        self.progress = progress

    def ref(self, key: str, path: str, weights: dict[str, torch.Tensor] | None = None) -> ModelRef:
        """A model reference for the actors; ``weights`` go to the object store once."""
        import ray

        return ModelRef(path=path, weights=ray.put(weights) if weights else None, key=key)

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

    def load(self, ref: ModelRef) -> None:
        """Every actor loads ``ref`` (a no-op where it is loaded)."""
        self._load(self.actors, ref)

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

        from orchestrator.evaluation.zeroshot import aggregate

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
        """Stop the actors and free their placement group."""
        self.group.kill()
        self.actors = []
