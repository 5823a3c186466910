"""Run configuration: YAML plus ``key=value`` overrides, validated into typed dataclasses.

Every problem found is reported at once in a single :class:`ConfigError`, each line
naming the dotted field and the offending value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError
from orchestrator.yamlconf import apply_overrides, build_dataclass, yaml_load

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


# ---------------------------------------------------------------- building

def validate(cfg: RunConfig) -> list[str]:
    """Semantic checks beyond types. Returns one line per problem."""
    p: list[str] = []
    m, c, pr, e, b = cfg.model, cfg.calibration, cfg.pruning, cfg.eval, cfg.backend
    if not m.source:
        p.append("model.source: must not be empty")
    if m.dtype not in DTYPES:
        p.append(f"model.dtype: {m.dtype!r} is not one of {', '.join(DTYPES)}")
    t = m.tiny
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "max_positions"):
        if getattr(t, name) <= 0:
            p.append(f"model.tiny.{name}: must be > 0, got {getattr(t, name)!r}")
    if t.heads > 0 and t.kv_heads > 0 and (t.heads % t.kv_heads or t.hidden % t.heads):
        p.append(
            f"model.tiny: heads ({t.heads}) must divide hidden ({t.hidden}) "
            f"and be a multiple of kv_heads ({t.kv_heads})"
        )
    if c.num_samples <= 0:
        p.append(f"calibration.num_samples: must be > 0, got {c.num_samples!r}")
    if c.seq_len < 2:
        p.append(f"calibration.seq_len: must be >= 2, got {c.seq_len!r}")
    if c.generate.temperature <= 0:
        p.append(f"calibration.generate.temperature: must be > 0, got {c.generate.temperature!r}")
    if not 0 < c.generate.top_p <= 1:
        p.append(f"calibration.generate.top_p: must be in (0, 1], got {c.generate.top_p!r}")
    if pr.method not in METHODS:
        p.append(f"pruning.method: {pr.method!r} is not one of {', '.join(METHODS)}")
    if pr.pattern not in PATTERNS:
        p.append(_pattern_problem(pr.pattern))
    elif pr.nm is not None and pr.sparsity is not None:
        n, mm = pr.nm
        if abs(pr.sparsity - n / mm) > 1e-9:
            p.append(f"pruning.sparsity: {pr.sparsity!r} contradicts pattern {pr.pattern} (implies {n / mm})")
    if pr.sparsity is not None and not 0 < pr.sparsity < 1:
        p.append(f"pruning.sparsity: must be in (0, 1), got {pr.sparsity!r}")
    if pr.sweep:
        if pr.nm is not None:
            p.append(f"pruning.sweep: needs pattern unstructured, got {pr.pattern!r}")
        for v in pr.sweep:
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                p.append(f"pruning.sweep: every sparsity must be in (0, 1), got {v!r}")
        if len(set(pr.sweep)) != len(pr.sweep):
            p.append(f"pruning.sweep: sparsities must be distinct, got {pr.sweep!r}")
        if pr.sparsity is not None and pr.sparsity not in pr.sweep:
            p.append(f"pruning.sparsity: {pr.sparsity!r} must be one of pruning.sweep {pr.sweep!r} (the saved model)")
        if cfg.backend.kind != "local":
            p.append(f"pruning.sweep: sweeps run on backend.kind=local, got {cfg.backend.kind!r}")
        if cfg.structured.enabled:
            p.append("pruning.sweep: not available with structured.enabled=true")
    if pr.gblm.norm not in ("l1", "l2"):
        p.append(f"pruning.gblm.norm: {pr.gblm.norm!r} is not one of l1, l2")
    if pr.gblm.alpha < 0:
        p.append(f"pruning.gblm.alpha: must be >= 0, got {pr.gblm.alpha!r}")
    if pr.gblm.grad_scale <= 0:
        p.append(f"pruning.gblm.grad_scale: must be > 0, got {pr.gblm.grad_scale!r}")
    if pr.sparsegpt.blocksize <= 0:
        p.append(f"pruning.sparsegpt.blocksize: must be > 0, got {pr.sparsegpt.blocksize!r}")
    if pr.sparsegpt.percdamp <= 0:
        p.append(f"pruning.sparsegpt.percdamp: must be > 0, got {pr.sparsegpt.percdamp!r}")
    p.extend(_structured_problems(cfg.structured))
    if e.num_windows <= 0:
        p.append(f"eval.num_windows: must be > 0, got {e.num_windows!r}")
    if e.seq_len < 2:
        p.append(f"eval.seq_len: must be >= 2, got {e.seq_len!r}")
    if e.workers < 0:
        p.append(f"eval.workers: must be >= 0 (0: in the coordinator process), got {e.workers!r}")
    if e.task_limit is not None and e.task_limit <= 0:
        p.append(f"eval.task_limit: must be > 0, got {e.task_limit!r}")
    if e.speed_prompt_len < 1 or e.speed_new_tokens < 2:
        p.append(f"eval.speed_new_tokens: needs prompt >= 1 and >= 2 new tokens, got {e.speed_prompt_len!r}, "
                 f"{e.speed_new_tokens!r}")
    if e.speed_repeats < 1:
        p.append(f"eval.speed_repeats: must be >= 1, got {e.speed_repeats!r}")
    if not e.speed_batch_sizes or any(not isinstance(x, int) or x < 1 for x in e.speed_batch_sizes):
        p.append(f"eval.speed_batch_sizes: must be positive integers, got {e.speed_batch_sizes!r}")
    if b.kind not in ("local", "ray"):
        p.append(f"backend.kind: {b.kind!r} is not one of local, ray")
    if b.workers <= 0:
        p.append(f"backend.workers: must be > 0, got {b.workers!r}")
    if b.forward_dtype not in DTYPES:
        p.append(f"backend.forward_dtype: {b.forward_dtype!r} is not one of {', '.join(DTYPES)}")
    if b.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        p.append(f"backend.placement_strategy: {b.placement_strategy!r} is not one of PACK, SPREAD, "
                 "STRICT_PACK, STRICT_SPREAD")
    if isinstance(b.grad_batch_size, bool) or not isinstance(b.grad_batch_size, int) or b.grad_batch_size < 1:
        p.append(f"backend.grad_batch_size: must be an integer >= 1, got {b.grad_batch_size!r}")
    if b.max_retries < 0:
        p.append(f"backend.max_retries: must be >= 0, got {b.max_retries!r}")
    if b.checkpoint_every < 1:
        p.append(f"backend.checkpoint_every: must be >= 1 (sequences per rank), got {b.checkpoint_every!r}")
    if b.collective_timeout_s <= 0:
        p.append(f"backend.collective_timeout_s: must be > 0, got {b.collective_timeout_s!r}")
    if b.num_threads < 0:
        p.append(f"backend.num_threads: must be >= 0, got {b.num_threads!r}")
    if not cfg.output.dir:
        p.append("output.dir: must not be empty")
    return p


def _structured_problems(s: StructuredConfig) -> list[str]:
    """Semantic checks of the ``structured`` section."""
    p: list[str] = []
    if not 0 < s.target < 1:
        p.append(f"structured.target: must be in (0, 1), got {s.target!r}")
    if s.allocation not in ("uniform", "adaptive"):
        p.append(f"structured.allocation: {s.allocation!r} is not one of uniform, adaptive")
    if s.indicator not in ("stability", "importance", "hybrid"):
        p.append(f"structured.indicator: {s.indicator!r} is not one of stability, importance, hybrid")
    if not 0 <= s.spread < 1:
        p.append(f"structured.spread: must be in [0, 1), got {s.spread!r}")
    known = ("element1", "element2", "vector")
    if not isinstance(s.estimators, list) or not s.estimators or any(e not in known for e in s.estimators):
        p.append(f"structured.estimators: expected a non-empty list of {', '.join(known)}, got {s.estimators!r}")
    if s.aggregation not in ("sum", "mean", "max", "prod"):
        p.append(f"structured.aggregation: {s.aggregation!r} is not one of sum, mean, max, prod")
    for name in ("protect_first", "protect_last"):
        if getattr(s, name) is not None and getattr(s, name) < 0:
            p.append(f"structured.{name}: must be >= 0 or null, got {getattr(s, name)!r}")
    for name in ("round_to", "minibatches"):
        if getattr(s, name) <= 0:
            p.append(f"structured.{name}: must be > 0, got {getattr(s, name)!r}")
    if s.grad_scale <= 0:
        p.append(f"structured.grad_scale: must be > 0, got {s.grad_scale!r}")
    r = s.recovery
    for name in ("rank", "blocks_per_group", "steps", "batch_size", "seq_len", "num_samples", "workers"):
        if getattr(r, name) <= 0:
            p.append(f"structured.recovery.{name}: must be > 0, got {getattr(r, name)!r}")
    if r.schedule not in ("joint", "sequential"):
        p.append(f"structured.recovery.schedule: {r.schedule!r} is not one of joint, sequential")
    if not 0 <= r.warmup < 1:
        p.append(f"structured.recovery.warmup: must be in [0, 1), got {r.warmup!r}")
    if r.alpha <= 0 or r.lr <= 0:
        p.append(f"structured.recovery: alpha and lr must be > 0, got {r.alpha!r}, {r.lr!r}")
    if r.forward_dtype not in DTYPES:
        p.append(f"structured.recovery.forward_dtype: {r.forward_dtype!r} is not one of {', '.join(DTYPES)}")
    if not 0 <= r.dropout < 1:
        p.append(f"structured.recovery.dropout: must be in [0, 1), got {r.dropout!r}")
    return p


def _pattern_problem(pattern: str) -> str:
    parts = str(pattern).split(":")
    if len(parts) == 2 and all(x.isdigit() for x in parts) and int(parts[0]) >= int(parts[1]):
        return f"pruning.pattern: {pattern!r} needs N < M"
    return f"pruning.pattern: {pattern!r} is not one of {', '.join(PATTERNS)}"


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict plus overrides.

    Raises:
        ConfigError: listing every problem found.
    """
    problems: list[str] = []
    data = json.loads(json.dumps(data or {}))  # deep copy, JSON-safe
    apply_overrides(data, overrides or [], problems)
    cfg = build_dataclass(RunConfig, data, "", problems)
    problems.extend(validate(cfg))  # fields with bad types kept their defaults: still safe to check
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: YAML file, or None for the embedded defaults.
        overrides: ``dotted.key=value`` strings, values parsed as YAML scalars.

    Raises:
        ConfigError: unreadable or malformed file, or any invalid field.
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config: file {str(p)!r} does not exist"])
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"config: {str(p)!r} is not valid YAML{where}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"config: {str(p)!r} is not a text file"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"config: {str(p)!r} must hold a mapping, got {type(data).__name__}"])
    return config_from_dict(data, overrides)
