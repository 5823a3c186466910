"""Each rank loads only its own ZeRO-3 partitions, read as slices of the checkpoint's safetensors files.

``from_pretrained`` under ZeRO-3 reads whole shards into host memory before it partitions them
(one rank reads everything and broadcasts). Here the model is built partitioned and empty
(``zero.Init`` + no initialisation), and every rank reads, for each parameter, only the contiguous
range of the flattened tensor its ``ds_tensor`` holds (elements ``[rank * P, (rank + 1) * P)`` with
``P = ceil(numel / W)``), one byte range of the file read with plain reads
(:class:`~orchestrator.outputs.shards.RangeReader`, no memory map): a rank reads ``1/W`` of the
checkpoint's bytes, and holds nothing of another rank's share.

Collective only in that every rank builds the same model; the reads are local.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.inputs.config import ModelConfig
from orchestrator.inputs.models import TORCH_DTYPES
from orchestrator.outputs.shards import RangeReader, checkpoint_keys

log = logging.getLogger(__name__)



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

    from actors.zero3 import plain_construction

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
    with plain_construction(dschf), no_init_weights(), deepspeed.zero.Init(config_dict_or_path=dschf.config):
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

    from actors.zero3 import load_partitioned

    dschf = HfDeepSpeedConfig(ds_cfg)  # must stay alive while the model is used
    loaded = load_own_partitions(model_path, model_cfg, dschf, rank, world)
    if loaded is not None:
        return loaded[0], dschf, loaded[1]
    log.warning("rank %d: %s cannot be read in slices (no safetensors, or renamed keys): every rank reads the "
                "whole checkpoint", rank, model_path)
    model, dschf = load_partitioned(model_path, model_cfg, ds_cfg)
    return model, dschf, {}
