"""The coordinator's evaluation step: perplexity and zero-shot tasks, in-process or on actors.

With ``eval.workers: 0`` everything runs in the coordinator process. With ``eval.workers: N``
the coordinator hands in a factory of N evaluation actors (:class:`EvalActors`, implemented by
``actors.evaluator.EvalGroup``); they load each model under evaluation (the
dense checkpoint, or the checkpoint with the pruned weights laid over it from the object
store) and the windows / examples are split across the actors; sweeps spread whole
candidates over the actors. Results are reduced exactly (sums of NLL, concatenated
per-example results), so they equal the in-process numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from orchestrator.errors import UsageError
from orchestrator.evaluation.lmeval import resolve_tasks, run_lm_eval
from orchestrator.evaluation.perplexity import perplexity
from orchestrator.inputs.config import RunConfig

log = logging.getLogger(__name__)

LM_EVAL_PREFIX = "lm_eval:"


class EvalActors(Protocol):
    """What the evaluator needs from a group of evaluation actors."""

    def ref(self, key: str, path: str, weights: dict[str, torch.Tensor] | None = None) -> Any:
        """A reference to a model the actors can load: a checkpoint, optionally with weights laid over it."""

    def load(self, ref: Any) -> None:
        """Have every actor load ``ref`` (the calls below load it too, when it is not loaded yet)."""

    def perplexity(self, ref: Any, windows: torch.Tensor) -> float:
        """Perplexity of ``(K, L)`` windows, split across the actors."""

    def multiple_choice(self, ref: Any, examples: list[dict]) -> list[dict]:
        """Per-example multiple-choice results in order."""

    def candidates(self, refs: list[Any], windows: torch.Tensor | None, tasks: dict[str, list[dict]]) -> list[dict]:
        """Several models evaluated in parallel."""

    def shutdown(self) -> None:
        """Stop the actors."""


def load_tasks(cfg: RunConfig) -> dict[str, list[dict]]:
    """Local multiple-choice tasks named in ``eval.tasks`` (builtin names or JSONL paths), limited."""
    from orchestrator.evaluation.zeroshot import load_task, task_path

    tasks = {}
    for name in cfg.eval.tasks:
        if name.startswith(LM_EVAL_PREFIX):
            continue
        path = task_path(name)
        if not path.is_file():
            raise UsageError(f"eval.tasks: {name!r} is neither a builtin task nor an existing JSONL file")
        examples = load_task(path)
        tasks[path.stem] = examples[: cfg.eval.task_limit] if cfg.eval.task_limit else examples
    return tasks


class Evaluator:
    """Evaluates models as ``eval.*`` says.

    Args:
        cfg: the run config.
        model_path: materialised dense model directory (readable by the actors).
        tokenizer: the model's tokenizer (in-process scoring).
        windows: ``(K, L)`` perplexity windows or None.
        progress: show progress bars (in-process work).
        start_actors: starts the evaluation actors (given by the coordinator when ``eval.workers > 0``).
    """

    def __init__(self, cfg: RunConfig, model_path: str, tokenizer: Any, windows: torch.Tensor | None,
                 progress: bool = True, start_actors: Callable[[], EvalActors] | None = None) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.windows = windows
        self.progress = progress
        on = cfg.eval.enabled  # eval.enabled: false evaluates nothing, the tasks included
        self.tasks = load_tasks(cfg) if on else {}
        #: lm-eval tasks with their settings resolved (``eval.num_fewshot`` / ``eval.task_limit`` as defaults)
        self.lm_eval_specs = resolve_tasks(cfg.eval.tasks, cfg.eval.num_fewshot, cfg.eval.task_limit) if on else []
        #: what decides each lm-eval task's numbers, one string per task (the dense-evaluation cache key hashes it)
        self.lm_eval_tasks = [s.identity() for s in self.lm_eval_specs]
        self.start_actors = start_actors
        self.distributed = (bool(cfg.eval_workers()) and start_actors is not None
                            and (windows is not None or bool(self.tasks)))
        self._group: EvalActors | None = None
        self.seconds: dict[str, float] = {}  # "<label>.perplexity" / "<label>.zeroshot": where evaluate's time went

    @property
    def group(self):
        """The evaluation actors, started on first use (None when evaluating in-process).

        :meth:`close` after each evaluation phase hands their CPUs/GPUs back, so the pruning
        workers can use the same devices in between.
        """
        if self.distributed and self._group is None:
            self._group = self.start_actors()
        return self._group

    @property
    def active(self) -> bool:
        """Whether there is anything to evaluate."""
        return self.windows is not None or bool(self.tasks) or bool(self.lm_eval_tasks)

    def ref(self, key: str, weights: dict[str, torch.Tensor] | None = None, path: str | None = None):
        """A model reference for the actors (weights go to the object store once)."""
        return self.group.ref(key, path or self.model_path, weights)

    def evaluate(self, model: nn.Module, ref: Any = None, label: str = "model") -> dict:
        """``{"ppl": float | None, "zeroshot": {task: result}}`` of one model.

        ``ref`` (from :meth:`ref`) is what the actors load; without it or without actors the
        in-process ``model`` is used.
        """
        from orchestrator.evaluation.zeroshot import aggregate, score_examples

        out: dict = {"ppl": None, "zeroshot": {}}
        t0 = time.perf_counter()
        if self.distributed and ref is not None:
            self.group.load(ref)
            t0 = self._lap(f"{label}.load", t0)  # the actors read the checkpoint and the pruned weights
            if self.windows is not None:
                out["ppl"] = self.group.perplexity(ref, self.windows)
                t0 = self._lap(f"{label}.perplexity", t0)
            for name, ex in self.tasks.items():
                out["zeroshot"][name] = {"status": "ok", **aggregate(self.group.multiple_choice(ref, ex)),
                                         "source": "rayprune"}
        else:
            if self.windows is not None:
                out["ppl"] = perplexity(model, self.windows, self.progress, f"{label} perplexity")
                t0 = self._lap(f"{label}.perplexity", t0)
            for name, ex in self.tasks.items():
                res = score_examples(model, self.tokenizer, ex, progress=self.progress)
                out["zeroshot"][name] = {"status": "ok", **aggregate(res), "source": "rayprune"}
        if self.lm_eval_tasks:
            for name, res in run_lm_eval(model, self.tokenizer, self.lm_eval_specs).items():
                out["zeroshot"][f"{LM_EVAL_PREFIX}{name}"] = {**res, "source": "lm-eval"}
        if out["zeroshot"]:
            self._lap(f"{label}.zeroshot", t0)
        return _clean(out)

    def _lap(self, key: str, t0: float) -> float:
        """Record the seconds since ``t0`` as ``key``; returns now."""
        now = time.perf_counter()
        self.seconds[key] = round(now - t0, 3)
        return now

    def candidates(self, models: list[nn.Module], refs: list[Any]) -> list[dict]:
        """Evaluate sweep candidates (in parallel on the actors when there are any)."""
        if not self.distributed or self.lm_eval_tasks:
            return [self.evaluate(m, r, f"candidate {i}") for i, (m, r) in enumerate(zip(models, refs, strict=True))]
        return self._on_actors(refs)

    def checkpoints(self, paths: list[str], keys: list[str]) -> list[dict]:
        """Evaluate checkpoint directories (a distributed sweep's candidates, as the ranks wrote them): in
        parallel on the actors, or in this process one at a time (each loaded, evaluated and dropped)."""
        from orchestrator.inputs.models import load_model

        refs = [self.group.ref(k, p) if self.distributed else None for k, p in zip(keys, paths, strict=True)]
        if self.distributed and not self.lm_eval_tasks:
            return self._on_actors(refs)
        out = []
        for key, path, ref in zip(keys, paths, refs, strict=True):
            model = load_model(path, self.cfg.model)
            out.append(self.evaluate(model, ref, key))
            del model
        return out

    def _on_actors(self, refs: list[Any]) -> list[dict]:
        res = self.group.candidates(refs, self.windows, self.tasks)
        for r in res:
            r["zeroshot"] = {t: {"status": "ok", **v, "source": "rayprune"} for t, v in r["zeroshot"].items()}
        return [_clean(r) for r in res]

    def close(self) -> None:
        """Stop the actors (a later evaluation starts new ones)."""
        if self._group is not None:
            self._group.shutdown()
            self._group = None


def _clean(res: dict) -> dict:
    """NaN standard errors (n = 1) become None so that report.json stays valid JSON."""
    for v in res["zeroshot"].values():
        for k, x in list(v.items()):
            if isinstance(x, float) and math.isnan(x):
                v[k] = None
    return res
