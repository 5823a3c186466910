"""Run configuration: YAML plus ``key=value`` overrides, validated into typed dataclasses.

Every problem found is reported at once in a single :class:`ConfigError`, each line
naming the dotted field and the offending value.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.inputs.fields import (  # noqa: F401 - re-exported: the config's one import point
    DTYPES,
    EXECUTION,
    MEASURE,
    METHODS,
    PATTERNS,
    RESULT,
    ROLES,
    ComputeDType,
    DType,
    Method,
    Pattern,
    Reconstruct,
    opt,
)
from orchestrator.inputs.pruning_config import (  # noqa: F401 - re-exported
    AdmmConfig,
    BlockTuneConfig,
    GblmConfig,
    LstsqConfig,
    OwlConfig,
    PruningConfig,
    SparseGptConfig,
)


@dataclass
class TinyModelConfig:
    """Shape of a seeded random LLaMA used in tests (``model.source: tiny``)."""

    layers: int = opt(2, gt=0, help="blocks")
    hidden: int = opt(64, gt=0, help="hidden size")
    heads: int = opt(4, gt=0, help="query heads")
    kv_heads: int = opt(2, gt=0, help="KV heads")
    intermediate: int = opt(128, gt=0, help="MLP width")
    max_positions: int = opt(256, gt=0, help="context length")
    seed: int = opt(0, help="weight seed")


@dataclass
class ModelConfig:
    """Which model to prune and how to load it."""

    source: str = opt("smollm2-135m", nonempty=True,
                      help="builtin name (`smollm2-135m`), `tiny`, a local HF directory, a `.gguf` file or a hub id")
    dtype: DType = opt("float32", help="parameter dtype while loading")
    revision: str | None = opt(None, help="hub revision (hub ids only)")
    trust_remote_code: bool = opt(False, help="run Python code shipped with the model; only when you trust it")
    gguf_file: str | None = opt(None, help="GGUF file name inside a hub repository")
    allow_pickle: bool = opt(False, help="also read pickle weights (`pytorch_model.bin`), which can run code")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class GenerateConfig:
    """Options of self-generated calibration (``calibration.source: generate``)."""

    prompt: str = opt("", help="text every generated sequence starts from (empty: BOS)")
    temperature: float = opt(1.0, gt=0, help="sampling temperature")
    top_p: float = opt(0.95, gt=0, le=1, help="nucleus sampling mass")


@dataclass
class CalibrationConfig:
    """Calibration text and how windows are sampled from it."""

    source: str = opt("generate", nonempty=True,
                      help="`.parquet`/`.jsonl`/`.txt` file or folder, a hub dataset, "
                           "`builtin:python-topics-calibration` / `builtin:python-topics-eval` (text Python ships), "
                           "or `generate` (model-written text)")
    text_column: str = opt("text", help="column holding the text (parquet/jsonl)")
    hub_config: str | None = opt(None, help="dataset config of a hub dataset")
    split: str = opt("train", help="split of a hub dataset")
    revision: str | None = opt(None, help="commit (or tag) of a hub dataset: pins what every run reads")
    num_samples: int = opt(32, gt=0, help="calibration windows N (`random.Random(seed).sample` of the windows)")
    seq_len: int = opt(512, ge=2, help="tokens per window L (BOS included where the tokenizer adds one)")
    seed: int = opt(0, help="sampling seed")
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class StructuredRecoveryConfig:
    """LoRA "group fine-tuning" after structured pruning (METHODS.md section 5)."""

    enabled: bool = opt(False, help="recover with LoRA after shrinking")
    rank: int = opt(8, gt=0, help="LoRA rank")
    alpha: float = opt(16.0, gt=0, help="LoRA alpha")
    dropout: float = opt(0.0, ge=0, lt=1, help="LoRA dropout (seeded per window)")
    lr: float = opt(1e-3, gt=0, help="peak learning rate (warm-up, then cosine)")
    warmup: float = opt(0.05, ge=0, lt=1, help="fraction of steps warming up")
    blocks_per_group: int = opt(10, gt=0, help="blocks sharing one adapter group")
    schedule: Literal["joint", "sequential"] = opt("joint", help="train every group at once, or group by group")
    steps: int = opt(60, gt=0, help="optimiser steps")
    batch_size: int = opt(4, gt=0, help="windows per step")
    seq_len: int = opt(512, gt=0, help="tokens per training window")
    loss: Literal["ce", "kd"] = opt("ce", help="`ce`: next-token cross-entropy; `kd`: KL divergence to the dense "
                                    "model's next-token distribution (its top `kd_topk` tokens)")
    kd_topk: int = opt(64, gt=0, le=4096, help="dense-model tokens per position kept as the distillation target "
                       "(host memory: used windows x seq_len x k x 12 bytes, shipped to every rank)")
    kd_temperature: float = opt(1.0, gt=0, help="softmax temperature of the distillation")
    source: str | None = opt(None, help="training text (null: `calibration.source`; `calibration`: its windows)")
    num_samples: int = opt(1024, gt=0, help="training windows drawn from the source")
    forward_dtype: ComputeDType = opt("auto", help="autocast dtype of the frozen base (adapters stay fp32); `auto`: "
                                      "bfloat16 where the device computes bf16 natively, else float32")
    workers: int = opt(1, gt=0, role=EXECUTION, help="> 1: data-parallel on Ray actors")
    zero3: bool = opt(False, role=EXECUTION, help="partition the pruned model and adapters over the `workers` with "
                      "DeepSpeed ZeRO-3 (a model that does not fit one accelerator; `rayprune plan` says when)")
    seed: int = opt(0, help="adapter init and dropout seed")


@dataclass
class StructuredConfig:
    """Structured pruning (SAAP on LLM-Pruner groups, METHODS.md section 5)."""

    enabled: bool = opt(False, help="remove attention groups and MLP channels instead of single weights")
    target: float = opt(0.2, gt=0, lt=1, help="fraction of decoder parameters removed")
    allocation: Literal["uniform", "adaptive", "global"] = opt(
        "adaptive", help="per-module amounts: equal ratios, ratios by indicator, or `global`: the cheapest groups "
                         "of the whole model by estimated loss per parameter, one threshold")
    indicator: Literal["stability", "importance", "hybrid"] = opt("importance", help="what adaptive allocation follows")
    spread: float = opt(0.5, ge=0, lt=1, help="how far adaptive ratios move from uniform")
    modules: Literal["all", "mlp"] = opt("all", help="`all`: attention KV groups and MLP channels; `mlp`: MLP "
                                                     "channels only (attention kept whole)")
    estimators: list[Literal["element1", "element2", "vector"]] = opt(
        factory=lambda: ["element1", "vector"], nonempty=True, help="importance estimators fused by uncertainty")
    aggregation: Literal["sum", "mean", "max", "prod"] = opt("sum", help="how a group's element scores combine")
    protect_first: int | None = opt(None, ge=0, hint="or null", help="blocks kept whole at the start (null: depth/10)")
    protect_last: int | None = opt(None, ge=0, hint="or null", help="blocks kept whole at the end (null: depth/15)")
    round_to: int = opt(8, gt=0, help="kept MLP widths rounded to a multiple of this")
    minibatches: int = opt(4, gt=0, help="mini-batches of the stability indicator")
    grad_scale: float = opt(1.0, gt=0, help="factor gradients are summed with")
    compensate: bool = opt(False, help="re-solve `o_proj` / `down_proj` by least squares on the calibration inputs "
                           "after their groups go, block by block")
    selection: Literal["importance", "reconstruction"] = opt(
        "importance", help="which groups of a module go: lowest fused importance, or (with `compensate`) those whose "
                           "removal the compensation recovers best (greedy OBS on the consumer's inputs)")
    compensate_percdamp: float = opt(0.01, ge=0, help="damping of the compensation's solves (fraction of the mean "
                                     "diagonal)")
    depth_blocks: int = opt(0, ge=0, help="whole blocks removed first, lowest block influence; the rest of "
                            "`target` comes from groups")
    recovery: StructuredRecoveryConfig = field(default_factory=StructuredRecoveryConfig)


@dataclass
class EvalConfig:
    """Evaluation after pruning (perplexity, zero-shot tasks, generation speed)."""

    enabled: bool = opt(True, role=MEASURE, help="evaluate at all")
    source: str | None = opt(None, role=MEASURE, help="perplexity text (as `calibration.source`); none: no perplexity")
    text_column: str = opt("text", role=MEASURE, help="column holding the text")
    revision: str | None = opt(None, role=MEASURE, help="commit (or tag) of a hub dataset `eval.source`")
    num_windows: int = opt(40, gt=0, role=MEASURE, help="the first K non-overlapping windows")
    seq_len: int = opt(512, ge=2, role=MEASURE, help="tokens per perplexity window")
    dense_baseline: bool = opt(True, role=MEASURE, help="evaluate the dense model too")
    cache_dense: bool = opt(True, role=EXECUTION, help="reuse the dense model's evaluation from an earlier run with "
                            "the same model, windows, tasks and library versions ($RAYPRUNE_CACHE/dense-eval)")
    workers: int | None = opt(None, ge=0, role=EXECUTION, hint="(0: in the coordinator process)",
                              help="evaluation actors (one GPU each where there are GPUs); 0: in the coordinator "
                                   "process; null: `backend.workers` actors on Ray, 0 with `backend.kind: local`")
    shard: bool = opt(False, role=EXECUTION, help="the evaluation actors share each model under ZeRO-3 (1/N of it "
                      "each), for a model larger than one actor's device (`rayprune plan` says when)")
    tasks: list[str] = opt(factory=list, role=MEASURE,
                           help="zero-shot tasks: builtin (`debian_cloze`), JSONL files, or lm-eval tasks "
                                "`lm_eval:NAME_OR_YAML[@num_fewshot=K,limit=N]` (an lm-eval task name or a task YAML "
                                "file; every metric the task defines is reported)")
    task_limit: int | None = opt(None, gt=0, role=MEASURE, help="examples per task (null: all)")
    num_fewshot: int = opt(0, ge=0, role=MEASURE,
                           help="in-context examples of lm-eval tasks without their own `@num_fewshot=K` (overrides "
                                "a task YAML's `num_fewshot`)")
    speed: bool = opt(False, role=MEASURE, help="prefill/decode tokens/s, dense vs pruned, interleaved")
    speed_prompt_len: int = opt(512, ge=1, role=MEASURE, help="prompt tokens of the speed runs")
    speed_new_tokens: int = opt(128, ge=2, role=MEASURE, help="generated tokens of the speed runs")
    speed_batch_sizes: list[int] = opt(factory=lambda: [1, 8], nonempty=True, role=MEASURE,
                                       help="batch sizes of the speed runs")
    speed_repeats: int = opt(3, ge=1, role=MEASURE, help="interleaved repeats (medians and ranges reported)")


@dataclass
class BackendConfig:
    """Where the work runs."""

    kind: Literal["local", "ray"] = opt("ray", role=EXECUTION, help="`local` (one process) or `ray` (ZeRO-3 actors)")
    workers: int = opt(2, gt=0, role=EXECUTION, help="pruning workers (one GPU each where there are GPUs)")
    address: str | None = opt(None, role=EXECUTION, help="Ray address: `auto` joins a running cluster")
    forward_dtype: ComputeDType = opt("auto", help="autocast dtype of block forwards (statistics stay fp32); `auto`: "
                                      "bfloat16 where every worker's device computes bf16 natively (GPUs of compute "
                                      "capability >= 8.0, CPUs with AVX512-BF16 or AMX), else float32")
    grad_batch_size: int = opt(4, ge=1, help="sequences per forward/backward of the distributed gradient pass")
    activation_checkpointing: bool | None = opt(
        None, role=EXECUTION, help="recompute each block's activations in the gradient pass's backward (the same "
        "statistics, a fraction of the memory); null: on where the plan without it leaves under 10% of a worker's "
        "device memory free")
    offload_stats: bool = opt(False, role=EXECUTION, help="keep the gradient-statistic partitions in (pinned) host "
                              "memory instead of on the accelerator")
    num_threads: int = opt(0, ge=0, role=EXECUTION, help="torch threads per actor (0: CPUs / workers)")
    max_retries: int = opt(2, ge=0, role=EXECUTION, help="restarts of a failed worker group (resuming)")
    capacity_wait_s: float = opt(900.0, gt=0, role=EXECUTION, hint="(seconds)",
                                 help="wait this long for a worker group's resources to be free (GPUs another job "
                                      "holds; after a failure, a lost node that KubeRay or the autoscaler replaces) "
                                      "before failing (a failed run keeps its checkpoints)")
    checkpoint_every: int = opt(8, ge=1, role=EXECUTION, hint="(sequences per rank)",
                                help="checkpoint the gradient statistics every K sequences per rank")
    checkpoint_interval_s: float = opt(
        300.0, ge=0, role=EXECUTION, hint="(seconds)",
        help="and at the pass's end, but only this long after the pass started or last saved (each save writes "
             "every rank's statistic partitions, 35 GB per rank for a 70B model on 8 workers: a pass shorter "
             "than this is recomputed after a failure instead); 0: every K sequences and at the end")
    collective_timeout_s: float = opt(1800.0, gt=0, role=EXECUTION,
                                      help="a collective whose peer stopped answering fails after this long")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt(
        "PACK", role=EXECUTION, help="Ray placement strategy of the workers")
    tf32: bool = opt(False, help="let fp32 matmuls of forwards and SparseGPT's updates use TF32 on GPUs of compute "
                     "capability >= 8.0 (statistics stay full fp32); no effect on CPUs")
    gpu_wait_s: float = opt(0.0, ge=0, role=EXECUTION, hint="(seconds)",
                            help="wait this long for GPUs to join an autoscaling cluster when it has fewer than "
                                 "the workers need (a cluster with none then fails instead of running on CPUs); "
                                 "0: decide from the cluster as it is")
    plan_check: bool = opt(True, role=EXECUTION, help="refuse a run whose plan does not fit the workers' memory, "
                           "before anything is loaded (`rayprune plan` prints the same numbers)")


@dataclass
class OutputConfig:
    """Where artifacts go."""

    dir: str = opt("runs/default", nonempty=True, role=EXECUTION, help="the run directory (`{key}`: the run key)")
    overwrite: bool = opt(False, role=EXECUTION, help="replace an existing run")
    save_model: bool = opt(True, role=MEASURE, help="write the pruned checkpoint (masks and report always)")


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the resolved config."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """SHA-256 of the fields that decide the model or what is measured (:data:`RESULT` and :data:`MEASURE`)."""
        return _sha(self.by_role(RESULT, MEASURE))

    def work_fingerprint(self) -> str:
        """SHA-256 of what decides the masks (:data:`RESULT` fields), not of how the run executes or is measured.

        Checkpoints carry it: a run may resume with other retries, timeouts or evaluation
        settings, never with another model, calibration set, pruning config or numerics.
        """
        return _sha(self.by_role(RESULT))

    def eval_workers(self) -> int:
        """``eval.workers`` resolved: null is ``backend.workers`` actors on Ray (GPU actors on a GPU cluster) and
        0 (in the coordinator) with the local backend."""
        if self.eval.workers is not None:
            return self.eval.workers
        return self.backend.workers if self.backend.kind == "ray" else 0

    def with_compute_dtypes(self, native_bf16: bool) -> RunConfig:
        """A copy with every ``auto`` compute dtype resolved (``backend.forward_dtype``, ``pruning.gblm.grad_dtype``).

        Args:
            native_bf16: whether every device that computes the run does bf16 natively
                (:func:`orchestrator.engine.device.native_bf16`).
        """
        out = copy.deepcopy(self)
        out.backend.forward_dtype = resolve_compute_dtype(out.backend.forward_dtype, native_bf16)
        out.pruning.gblm.grad_dtype = resolve_compute_dtype(out.pruning.gblm.grad_dtype, native_bf16)
        return out

    def compute_dtypes(self) -> dict[str, str]:
        """The autocast dtypes of the block pass and the gradient pass (for reports)."""
        return {"forward_dtype": self.backend.forward_dtype, "grad_dtype": self.pruning.gblm.grad_dtype}

    def by_role(self, *roles: str) -> dict[str, Any]:
        """The resolved config as a nested dict holding only fields of the given roles."""
        return _select(self, set(roles))


def resolve_compute_dtype(name: str, native_bf16: bool) -> str:
    """``name``, or for ``auto`` bfloat16 where the hardware computes bf16 natively and float32 elsewhere."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16 else "float32"


def _select(obj: Any, roles: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sub = _select(value, roles)
            if sub:
                out[f.name] = sub
        elif f.metadata.get("role", RESULT) in roles:
            out[f.name] = json.loads(json.dumps(value))
    return out


def _sha(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
