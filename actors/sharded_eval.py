"""Evaluation of a model too large for one device: ZeRO-3 inference partitioning across an actor group.

Each :class:`ShardedEvalWorker` holds ``1/W`` of the model's parameters (loaded partitioned, as the
pruning workers load it) in a DeepSpeed inference engine that gathers each module's parameters for
its forward and frees them after. Every forward is collective, so the ranks run the same number of
forwards: each scores its own contiguous part of the windows (or examples) with the same functions
as one process (:func:`~orchestrator.evaluation.perplexity.window_nll`,
:func:`~orchestrator.evaluation.zeroshot.score_examples`), and after every forward the ranks agree
(a one-element all-reduce) whether any of them ran a real one; a rank out of work runs dummy forwards
until none did. (A rank cannot simply count its forwards and pad at the end: how many forwards the
scorer's batching takes is known only once it ran, and a count exchanged early would meet the other
ranks' parameter gathers.) The coordinator adds the NLL sums and concatenates per-example results
in order, so the numbers equal one process's. :class:`ShardedEvalGroup` offers the same interface
as :class:`~actors.evaluator.EvalGroup` (the coordinator's ``EvalActors``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from actors.evaluator import ModelRef, split
from actors.group import ActorGroup, GroupMember, GroupSpec

log = logging.getLogger(__name__)


class ShardedEvalWorker(GroupMember):
    """One rank of a sharded evaluation group: a ZeRO-3 partition of the model under evaluation."""

    def __init__(self, num_threads: int = 1) -> None:
        super().__init__(num_threads)
        self.key: str | None = None
        self.model = self.engine = self.dschf = self.tokenizer = None
        self.finishing = False  # out of work: forwards are dummies
        self.any_real = True  # whether some rank's last forward was a real one

    def load(self, ref: ModelRef, model_cfg: Any, weights: dict[str, torch.Tensor] | None = None) -> int:
        """Load ``ref`` partitioned (collective; a no-op when already loaded); returns this rank's bytes."""
        import deepspeed

        from actors.loading import ds_config, load_zero3, model_limits
        from actors.zero3 import partition_bytes
        from orchestrator.inputs.models import load_tokenizer

        if self.key != ref.key or self.model is None:
            self.model = self.engine = None
            from transformers import AutoConfig

            mc = AutoConfig.from_pretrained(ref.path, trust_remote_code=model_cfg.trust_remote_code)
            config = ds_config(self.world, limits=model_limits(mc, model_cfg.dtype, self.device))
            self.model, self.dschf, _ = load_zero3(ref.path, model_cfg, config, self.rank, self.world)
            for p in self.model.parameters():
                p.requires_grad_(False)
            # no optimizer: an inference engine whose hooks gather each module's parameters around its forward
            self.engine = deepspeed.initialize(model=self.model, config=config)[0]
            self.engine.eval()
            self.model.register_forward_hook(self._agree)
            if weights:
                self._lay_over(weights)
            self.tokenizer = load_tokenizer(ref.path, model_cfg)
            self.key = ref.key
        return partition_bytes(self.model)

    def _agree(self, *_: Any) -> None:
        """After every forward: did any rank run a real one (collective)?"""
        import torch.distributed as dist

        flag = torch.tensor([0 if self.finishing else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.any_real = bool(flag.item())

    def _lay_over(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` (full tensors) into their partitions (collective, one parameter at a time)."""
        import deepspeed

        params = dict(self.model.named_parameters())
        for name in sorted(weights):
            p = params[name]
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if self.rank == 0:
                    p.data.copy_(weights[name].to(p.device, p.dtype))

    @torch.no_grad()
    def _even_out(self) -> None:
        """Dummy forwards until no rank ran a real one (collective)."""
        dummy = torch.zeros((1, 2), dtype=torch.int64, device=self.device)
        self.finishing = True
        try:
            self.model(dummy, use_cache=False)
            while self.any_real:
                self.model(dummy, use_cache=False)
        finally:
            self.finishing = False

    def nll(self, windows: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL of this rank's ``(k, L)`` windows and its predicted tokens (collective)."""
        from orchestrator.evaluation.perplexity import window_nll

        out = window_nll(self.model, windows.to(self.device)) if windows.shape[0] else (0.0, 0)
        self._even_out()
        return out

    def mc(self, examples: list[dict]) -> list[dict]:
        """Per-example multiple-choice results of this rank's examples (collective)."""
        from orchestrator.evaluation.zeroshot import score_examples

        out = score_examples(self.model, self.tokenizer, examples) if examples else []
        self._even_out()
        return out

    def memory(self) -> dict[str, int]:
        """This rank's parameter-partition bytes."""
        from actors.zero3 import partition_bytes

        return {"rank": self.rank, "model_state_bytes": partition_bytes(self.model) if self.model is not None else 0}


class ShardedEvalGroup:
    """``spec.workers`` ranks sharing one model under ZeRO-3 (``spec.deepspeed``; NCCL on GPUs, gloo on CPUs).

    Args:
        spec: the group, chosen by the coordinator.
        model_cfg: model options used to load every checkpoint.
        progress: unused (each call is one collective step); kept for the ``EvalActors`` interface.
    """

    def __init__(self, spec: GroupSpec, model_cfg: Any, progress: bool = False) -> None:
        self.group = ActorGroup(ShardedEvalWorker, spec)
        self.actors = self.group.actors
        self.model_cfg = model_cfg
        self.workers = spec.workers

    def ref(self, key: str, path: str, weights: dict[str, torch.Tensor] | None = None) -> ModelRef:
        """A model reference; ``weights`` go to the object store once."""
        import ray

        return ModelRef(path=path, weights=ray.put(weights) if weights else None, key=key)

    def load(self, ref: ModelRef) -> None:
        """Every rank loads its partition of ``ref`` (collective; a no-op where it is loaded)."""
        self._load(ref)

    def _load(self, ref: ModelRef) -> list[int]:
        return self.group.get([a.load.remote(ref, self.model_cfg, ref.weights) for a in self.actors])

    def _parts(self, n: int) -> list[tuple[int, int]]:
        """One contiguous ``[lo, hi)`` per rank (empty where there are fewer items than ranks)."""
        parts = split(n, self.workers)
        return parts + [(n, n)] * (self.workers - len(parts))

    def perplexity(self, ref: ModelRef, windows: torch.Tensor) -> float:
        """Perplexity of ``(K, L)`` windows, split contiguously over the ranks."""
        self._load(ref)
        sums = self.group.get([a.nll.remote(windows[lo:hi])
                               for a, (lo, hi) in zip(self.actors, self._parts(windows.shape[0]), strict=True)])
        return math.exp(sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1))

    def multiple_choice(self, ref: ModelRef, examples: list[dict]) -> list[dict]:
        """Per-example results in the original order, examples split over the ranks."""
        self._load(ref)
        parts = self.group.get([a.mc.remote(examples[lo:hi])
                                for a, (lo, hi) in zip(self.actors, self._parts(len(examples)), strict=True)])
        return [r for part in parts for r in part]

    def candidates(self, refs: list[ModelRef], windows: torch.Tensor | None,
                   tasks: dict[str, list[dict]] | None = None) -> list[dict]:
        """Several models, one after the other (each spans the whole group)."""
        from orchestrator.evaluation.zeroshot import aggregate

        return [{"ppl": self.perplexity(ref, windows) if windows is not None else None,
                 "zeroshot": {t: aggregate(self.multiple_choice(ref, ex)) for t, ex in (tasks or {}).items()}}
                for ref in refs]

    def memory(self) -> list[dict]:
        """Each rank's parameter-partition bytes."""
        return self.group.execute("memory")

    def shutdown(self) -> None:
        """Stop the actors and free their placement group."""
        self.group.kill()
        self.actors = []
