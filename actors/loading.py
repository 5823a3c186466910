"""Each rank loads only its own ZeRO-3 partitions, read as slices of the checkpoint's safetensors files.

``from_pretrained`` under ZeRO-3 reads whole shards into host memory before it partitions them
(one rank reads everything and broadcasts). Here the model is built partitioned and empty
(``zero.Init`` + no initialisation), and every rank reads, for each parameter, only the contiguous
range of the flattened tensor its ``ds_tensor`` holds (elements ``[rank * P, (rank + 1) * P)`` with
``P = ceil(numel / W)``), one byte range of the file read with plain reads
(:class:`~orchestrator.outputs.shards.RangeReader`, no memory map): a rank reads ``1/W`` of the
checkpoint's bytes, and holds nothing of another rank's share.

Collective only in that every rank builds the same model; the reads are local. The DeepSpeed config every
ZeRO-3 engine of a rank uses (:func:`ds_config`, its live and prefetch limits sized for the model) lives here too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.inputs.config import ModelConfig
from orchestrator.inputs.models import TORCH_DTYPES
from orchestrator.outputs.shards import RangeReader, checkpoint_keys
from orchestrator.planner import ZERO3_MAX_LIVE_PARAMETERS, ZERO3_PREFETCH_BUCKET

log = logging.getLogger(__name__)

#: the statistics engine's reduction bucket: it trains one norm weight, so 20M elements would be idle memory
STATS_REDUCE_BUCKET = 1_000_000


def ds_config(world_size: int, reduce_bucket_size: int = 20_000_000,
              limits: tuple[int, int] = (ZERO3_MAX_LIVE_PARAMETERS, ZERO3_PREFETCH_BUCKET)) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO-3 engine.

    Args:
        world_size: ranks.
        reduce_bucket_size: elements of the gradient-reduction bucket DeepSpeed allocates when the engine starts
            (in the model dtype); the statistics engine trains one norm weight and passes
            :data:`STATS_REDUCE_BUCKET`.
        limits: ``(max live, prefetch bucket)`` parameter elements (:func:`model_limits` for a model).
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            # the defaults (5e8-element buckets, 1e9 sub-groups) allocate GiBs of fp32 scratch per rank
            "reduce_bucket_size": reduce_bucket_size,
            "stage3_prefetch_bucket_size": limits[1],
            "stage3_max_live_parameters": limits[0],
            "stage3_max_reuse_distance": 10_000_000,
            "sub_group_size": 100_000_000,
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def model_limits(config: Any, dtype: str, device: torch.device) -> tuple[int, int]:
    """ZeRO-3's live and prefetch limits of a model config on ``device`` (:func:`orchestrator.planner.zero3_limits`)."""
    from orchestrator.engine.device import device_memory_bytes
    from orchestrator.planner import zero3_limits
    from orchestrator.shapes import ModelShape, element_bytes

    try:
        shape = ModelShape.from_config(config)
    except ValueError:  # not a LLaMA-like config: the fixed limits
        shape = None
    return zero3_limits(shape, element_bytes(dtype), device_memory_bytes(device))


def in_model_dtype(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``config`` with the model dtype's precision section enabled, for ``zero.Init``.

    ``zero.Init`` partitions in its config's dtype: fp32 unless a ``bf16``/``fp16`` section is enabled, which
    silently doubled a bf16 model's partitions. Its ``dtype=`` argument is no way out: on an accelerator without
    fp16 (a CPU) DeepSpeed resolves any given dtype to bf16 (``_set_dtype``'s precedence).
    """
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)
    return {**config, precision: {"enabled": True}} if precision else config


@contextlib.contextmanager
def plain_construction(dschf: Any):
    """Models built inside are plain ones, although ``dschf`` (a live ``HfDeepSpeedConfig``) would make
    transformers build them partitioned; it is live again afterwards."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(dschf)


def load_partitioned(model_path: str, model_cfg: ModelConfig, config: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Load a causal LM whose parameters are partitioned across ranks while loading.

    Args:
        model_path: a materialised model directory.
        model_cfg: model options (dtype, revision, trust_remote_code).
        config: DeepSpeed config with ZeRO stage 3.

    Returns:
        ``(model, hf_ds_config)``; keep ``hf_ds_config`` alive as long as the model is used.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dschf = HfDeepSpeedConfig(in_model_dtype(config, model_cfg.dtype))  # must stay alive: from_pretrained checks
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=TORCH_DTYPES[model_cfg.dtype], revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=None if getattr(model_cfg, "allow_pickle", False) else True,
    )
    return model.eval(), dschf



def meta_parameter_names(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> list[str]:
    """Names of a model's parameters (tied ones once), from its config alone (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return [n for n, _ in model.named_parameters()]


def sliceable(keys: dict[str, str] | None, names: list[str]) -> dict[str, str] | None:
    """Tensor name -> file for every name in ``names`` when the checkpoint's safetensors (``keys``, from
    :func:`~orchestrator.outputs.shards.checkpoint_keys`) hold them all under those names; None otherwise
    (pickle weights, or keys transformers renames while loading)."""
    if keys is None or any(n not in keys for n in names):
        return None
    return {n: keys[n] for n in names}


def load_own_partitions(model_path: str, model_cfg: ModelConfig, dschf: Any, rank: int,
                        world: int) -> tuple[nn.Module, dict[str, float]] | None:
    """Build the model partitioned and fill this rank's partitions from the checkpoint's slices.

    Args:
        model_path: a materialised model directory.
        model_cfg: model options (dtype, trust_remote_code).
        dschf: the live ``HfDeepSpeedConfig`` (ZeRO-3): transformers builds the model under ``zero.Init``.
        rank: this rank.
        world: ranks.

    Returns:
        ``(model, {"read_bytes", "tensor_bytes", "seconds"})`` (bytes this rank read, bytes of every
        tensor of the checkpoint it loads), or None when the checkpoint cannot be sliced (the caller
        falls back to ``from_pretrained``).
    """
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = TORCH_DTYPES[model_cfg.dtype]
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
    with plain_construction(dschf):  # the meta skeleton is built without zero.Init
        names = meta_parameter_names(config, dtype, model_cfg.trust_remote_code)
    keys = checkpoint_keys(model_path)
    files = sliceable(keys, names)
    if files is None:
        return None
    t0 = time.perf_counter()
    # Partitioned as it is built, and never initialised: every value is read below. Not ``from_config`` under the
    # live ZeRO-3 config: that gathers every module afterwards to initialise it on rank 0 and broadcasts it back
    # (``initialize_weights_zero3``), moving the whole model through the collectives for values thrown away.
    init = deepspeed.zero.Init(config_dict_or_path=in_model_dtype(dschf.config, model_cfg.dtype))
    with plain_construction(dschf), no_init_weights(), init:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    model.tie_weights()
    params = dict(model.named_parameters())
    read = total = 0
    by_file: dict[str, list[str]] = {}
    for name, rel in files.items():
        by_file.setdefault(rel, []).append(name)
    with torch.no_grad():
        for rel, names in sorted(by_file.items()):
            with RangeReader(Path(model_path) / rel) as f:
                for name in names:
                    p = params[name]
                    part = p.ds_tensor  # (P,) this rank's partition
                    numel = int(p.ds_numel)
                    lo = min(numel, rank * part.numel())
                    hi = min(numel, lo + part.numel())
                    flat = f.read_flat(name, lo, hi)  # (hi - lo,) exactly this rank's elements
                    read += flat.numel() * flat.element_size()
                    total += numel * flat.element_size()
                    if hi > lo:
                        part.data[: hi - lo].copy_(flat.to(part.dtype))
                    if part.numel() > hi - lo:
                        part.data[hi - lo :].zero_()  # the padding of the last partition
    for name, buf in model.named_buffers():  # persistent buffers the checkpoint holds (rare; small)
        if name in keys:
            with safe_open(str(Path(model_path) / keys[name]), framework="pt") as f:
                buf.data.copy_(f.get_tensor(name))
    seconds = time.perf_counter() - t0
    log.info("rank %d of %d: read %.1f MiB of the checkpoint's tensors for its partitions in %.1f s",
             rank, world, read / 2**20, seconds)
    return model.eval(), {"read_bytes": read, "tensor_bytes": total, "seconds": seconds}


def load_zero3(model_path: str, model_cfg: ModelConfig, ds_cfg: dict, rank: int, world: int) -> tuple:
    """``(model, hf_ds_config, io)``: this rank's partitions read as checkpoint slices
    (:func:`load_own_partitions`), or ``from_pretrained`` under ZeRO-3 for checkpoints that cannot be sliced
    (pickle weights, renamed keys; ``io`` is then empty). Keep ``hf_ds_config`` alive while the model is used."""
    from transformers.integrations import HfDeepSpeedConfig

    dschf = HfDeepSpeedConfig(ds_cfg)  # must stay alive while the model is used
    loaded = load_own_partitions(model_path, model_cfg, dschf, rank, world)
    if loaded is not None:
        return loaded[0], dschf, loaded[1]
    log.warning("rank %d: %s cannot be read in slices (no safetensors, or renamed keys): every rank reads the "
                "whole checkpoint", rank, model_path)
    model, dschf = load_partitioned(model_path, model_cfg, ds_cfg)
    return model, dschf, {}
