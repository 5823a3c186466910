"""Run configuration: YAML plus ``key=value`` overrides, validated into typed dataclasses.

Every problem found is reported at once in a single :class:`ConfigError`, each line
naming the dotted field and the offending value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")
PATTERNS = ("unstructured", "2:4", "4:8")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TinyModelConfig:
    """Shape of a seeded random LLaMA used in tests (``model.source: tiny``)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 256
    seed: int = 0


@dataclass
class ModelConfig:
    """Which model to prune and how to load it.

    Attributes:
        source: builtin name, ``tiny``, a local HF directory, a ``.gguf`` file or a hub id.
        dtype: parameter dtype while loading.
        revision: hub revision (hub ids only).
        trust_remote_code: run Python code shipped with the model; off unless set explicitly.
        gguf_file: GGUF file name inside a hub repository.
        allow_pickle: load pickle weights (``pytorch_model.bin``); off by default because
            unpickling untrusted files can run code: only ``.safetensors`` weights are read.
    """

    source: str = "smollm2-135m"
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    allow_pickle: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class GenerateConfig:
    """Options of self-generated calibration (``calibration.source: generate``)."""

    prompt: str = ""
    temperature: float = 1.0
    top_p: float = 0.95


@dataclass
class CalibrationConfig:
    """Calibration text and how windows are sampled from it."""

    source: str = "generate"
    text_column: str = "text"
    hub_config: str | None = None
    split: str = "train"
    num_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class GblmConfig:
    """GBLM-Pruner options (METHODS.md section 2)."""

    alpha: float = 100.0
    norm: str = "l1"
    grad_scale: float = 100.0


@dataclass
class SparseGptConfig:
    """SparseGPT options (METHODS.md section 2)."""

    blocksize: int = 128
    percdamp: float = 0.01


@dataclass
class PruningConfig:
    """What to prune and how."""

    method: str = "gblm"
    sparsity: float | None = None
    pattern: str = "unstructured"
    sequential: bool = True
    sweep: list[float] = field(default_factory=list)
    gblm: GblmConfig = field(default_factory=GblmConfig)
    sparsegpt: SparseGptConfig = field(default_factory=SparseGptConfig)

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` for an N:M pattern, ``None`` for unstructured."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        """The sparsity every pruned matrix must reach."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)


@dataclass
class StructuredRecoveryConfig:
    """LoRA "group fine-tuning" after structured pruning (METHODS.md section 5).

    ``schedule``: ``joint`` trains the adapters of every group of ``blocks_per_group`` blocks at
    once, ``sequential`` group by group (``steps`` split over the groups); each step takes
    ``batch_size`` windows of ``seq_len`` tokens out of ``num_samples`` drawn from ``source``
    (None: ``calibration.source``; ``calibration``: the calibration windows themselves); ``workers``
    > 1 runs it data-parallel on Ray actors.
    """

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 1e-3
    warmup: float = 0.05
    blocks_per_group: int = 10
    schedule: str = "joint"
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 512
    source: str | None = None
    num_samples: int = 1024
    forward_dtype: str = "bfloat16"
    workers: int = 1
    seed: int = 0


@dataclass
class StructuredConfig:
    """Structured pruning (SAAP on LLM-Pruner groups, METHODS.md section 5)."""

    enabled: bool = False
    target: float = 0.2
    allocation: str = "adaptive"
    indicator: str = "importance"
    spread: float = 0.5
    estimators: list[str] = field(default_factory=lambda: ["element1", "vector"])
    aggregation: str = "sum"
    protect_first: int | None = None
    protect_last: int | None = None
    round_to: int = 8
    minibatches: int = 4
    grad_scale: float = 1.0
    recovery: StructuredRecoveryConfig = field(default_factory=StructuredRecoveryConfig)


@dataclass
class EvalConfig:
    """Perplexity evaluation after pruning."""

    enabled: bool = True
    source: str | None = None
    text_column: str = "text"
    num_windows: int = 40
    seq_len: int = 512
    dense_baseline: bool = True
    workers: int = 0
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    speed: bool = False
    speed_prompt_len: int = 512
    speed_new_tokens: int = 128
    speed_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    speed_repeats: int = 3


@dataclass
class BackendConfig:
    """Where the work runs."""

    kind: str = "ray"
    workers: int = 2
    address: str | None = None
    forward_dtype: str = "float32"
    grad_batch_size: int = 4
    num_threads: int = 0
    max_retries: int = 2
    checkpoint_every: int = 8
    collective_timeout_s: float = 1800.0
    placement_strategy: str = "PACK"


@dataclass
class OutputConfig:
    """Where artifacts go."""

    dir: str = "runs/default"
    overwrite: bool = False
    save_model: bool = True


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
        """SHA-256 of the resolved config's canonical JSON (output section excluded)."""
        data = self.to_dict()
        data.pop("output", None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def work_fingerprint(self) -> str:
        """SHA-256 of what decides the masks (model, data, method, numerics), not of how the run is executed.

        Checkpoints carry it: a run may resume with other retries, timeouts or evaluation
        settings, never with another model, calibration set, pruning config or numerics.
        """
        data = self.to_dict()
        keep = {k: data[k] for k in ("model", "calibration", "pruning", "structured")}
        keep["backend"] = {k: data["backend"][k] for k in ("grad_batch_size", "forward_dtype")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
