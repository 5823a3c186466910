"""Physically remove groups, keep the model config in step, and save / reload checkpoints.

Per-layer kept sizes are recorded in ``config.rayprune_layer_sizes`` (a list of
``{"kv_heads", "intermediate"}``). When every block keeps the same sizes the config's
own fields are rewritten too, so ``from_pretrained`` reloads the checkpoint; otherwise
the checkpoint carries its modeling code (:mod:`orchestrator.structured.portable`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from orchestrator.engine.blocks import decoder_blocks
from orchestrator.errors import UsageError
from orchestrator.inputs.config import ModelConfig
from orchestrator.inputs.models import PICKLE_SUFFIXES, TORCH_DTYPES, check_weight_format, load_model
from orchestrator.structured.groups import ModuleGroups, arch_spec, group_index, head_dim, module_groups
from orchestrator.structured.portable import (
    CLASS_NAME,
    MODULE_NAME,
    SIZES_KEY,
    STRUCTURE_KEY,
    load_portable,
    set_attention_sizes,
    shipped_source,
)

log = logging.getLogger(__name__)



def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, attr = name.rsplit(".", 1)
    return model.get_submodule(mod_name), attr


@torch.no_grad()
def keep_groups(model: nn.Module, mod: ModuleGroups, keep: torch.Tensor) -> None:
    """Shrink one module in place to the given groups.

    Args:
        model: the model owning ``mod``.
        mod: the module's group description (from the unshrunk model).
        keep: ``(k,)`` group ids to keep (sorted here, so the order of kept groups is stable).
    """
    keep = torch.sort(keep.long()).values
    by_param: dict[str, list] = {}
    for sl in mod.slices:  # a fused matrix holds several segments: keep each one's groups, in order
        by_param.setdefault(sl.name, []).append(sl)
    for name, slices in by_param.items():
        owner, attr = _owner(model, name)
        old = getattr(owner, attr)
        idx = torch.cat([group_index(sl, keep) for sl in sorted(slices, key=lambda x: x.offset)])
        new = nn.Parameter(old.data.index_select(slices[0].dim, idx).contiguous(), requires_grad=old.requires_grad)
        setattr(owner, attr, new)
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = new.shape


@torch.no_grad()
def zero_groups(model: nn.Module, mod: ModuleGroups, drop: torch.Tensor) -> None:
    """Zero the given groups in place without shrinking (the "masked" reference)."""
    for sl in mod.slices:
        owner, attr = _owner(model, sl.name)
        getattr(owner, attr).data.index_fill_(sl.dim, group_index(sl, drop), 0.0)


def layer_sizes(model: nn.Module) -> list[dict[str, int]]:
    """Current ``{"kv_heads", "intermediate"}`` of every block, read from the weights."""
    sizes: list[dict[str, int]] = [{} for _ in decoder_blocks(model)]
    for mod in module_groups(model):
        sizes[mod.layer]["kv_heads" if mod.kind == "attn" else "intermediate"] = mod.num_groups
    return sizes


def sync_config(model: nn.Module) -> list[dict[str, int]]:
    """Write the kept sizes into ``model.config`` (per-layer list; global fields when uniform).

    Returns:
        The per-layer sizes.
    """
    cfg = model.config
    cfg.head_dim = head_dim(cfg)  # freeze it: hidden / heads changes once heads go
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    sizes = layer_sizes(model)
    setattr(cfg, SIZES_KEY, sizes)
    uniform = is_uniform(sizes)
    if uniform:
        cfg.num_key_value_heads = sizes[0]["kv_heads"]
        cfg.num_attention_heads = sizes[0]["kv_heads"] * n_rep
        cfg.intermediate_size = sizes[0]["intermediate"]
    attn_module = arch_spec(model)["attn"]["module"]
    for block, size in zip(decoder_blocks(model), sizes, strict=True):  # keep module attributes honest
        set_attention_sizes(getattr(block, attn_module), cfg, size["kv_heads"], uniform)
    return sizes


def is_uniform(sizes: list[dict[str, int]]) -> bool:
    """Every block keeps the same sizes."""
    return all(s == sizes[0] for s in sizes)


def save_structured(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Save a shrunk model (safetensors + config with per-layer sizes).

    Uniform sizes give a plain checkpoint of the original architecture. Per-layer sizes also get
    ``modeling_rayprune.py`` (:mod:`orchestrator.structured.portable`) and an ``auto_map``, so
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it without rayprune.

    Returns:
        The directory.
    """
    path = Path(path)
    sizes = sync_config(model)
    if not is_uniform(sizes):
        spec = arch_spec(model)
        setattr(model.config, STRUCTURE_KEY, {k: {"module": v["module"], "rows": list(v["rows"]),
                                                  "cols": list(v["cols"])} for k, v in spec.items()})
        model.config.auto_map = {"AutoModelForCausalLM": f"{MODULE_NAME}.{CLASS_NAME}"}
    model.save_pretrained(path, safe_serialization=True)
    if not is_uniform(sizes):
        (path / f"{MODULE_NAME}.py").write_text(shipped_source(model.config.model_type))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_structured(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """Load a checkpoint written by :func:`save_structured` (uniform or per-layer sizes).

    Args:
        path: checkpoint directory.
        dtype: parameter dtype.
        allow_pickle: also load pickle weights (``pytorch_model.bin``; their unpickling can run code),
            as ``model.allow_pickle`` does for :func:`~orchestrator.inputs.models.load_model`. Off, only
            safetensors weights load: a stray ``.safetensors`` file next to pickle weights is refused.
            Checkpoints with per-layer sizes always load from safetensors.

    Raises:
        UsageError: the directory is not a checkpoint, has no safetensors weights (``allow_pickle``
            off), or its weights do not match the sizes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"structured checkpoint {str(path)!r} has no config.json")
    if not allow_pickle:
        _check_safetensors_weights(path)
    sizes = getattr(AutoConfig.from_pretrained(path), SIZES_KEY, None)
    try:
        if not sizes or is_uniform(sizes):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                        use_safetensors=None if allow_pickle else True).eval()
        return load_portable(str(path), dtype)
    except OSError as exc:
        raise UsageError(f"structured checkpoint {str(path)!r}: cannot load its weights "
                         f"({str(exc).splitlines()[0][:200]})") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(f"structured checkpoint {str(path)!r}: weights do not match the sizes "
                         f"({str(exc).splitlines()[0][:200]})") from None


def _check_safetensors_weights(path: Path) -> None:
    """Refuse a checkpoint whose weights are not a readable safetensors set (``model.safetensors`` or
    the shards its index names): a dummy ``.safetensors`` file must not wave pickle weights through."""
    import json

    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"structured checkpoint {str(path)!r}: {index.name} is not a safetensors index") from None
    files = [path / f for f in files] or [path / "model.safetensors"]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - missing, empty or corrupt: not loadable weights
            if pickled:
                raise UsageError(
                    f"structured checkpoint {str(path)!r} has only pickle weights ({', '.join(pickled[:3])}); "
                    "convert them to safetensors, or set model.allow_pickle=true if you trust the files"
                ) from None
            raise UsageError(f"structured checkpoint {str(path)!r} has no readable safetensors weights "
                             f"({f.name})") from None


def load_checkpoint(path: str, model_cfg: ModelConfig, dtype: str | None = None) -> nn.Module:
    """Load any checkpoint a run writes or reads: one with per-layer sizes (a SAAP model) through
    :func:`load_structured`, every other through :func:`~orchestrator.inputs.models.load_model`.

    Both honour ``model_cfg.allow_pickle`` (off: only safetensors weights load)."""
    import json

    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and SIZES_KEY in json.loads(cfg_file.read_text()):
        check_weight_format(path, model_cfg)
        return load_structured(path, TORCH_DTYPES[dtype or model_cfg.dtype], model_cfg.allow_pickle).eval()
    return load_model(path, model_cfg, dtype)
