"""Physically remove groups, keep the model config in step, and save / reload checkpoints.

Per-layer kept sizes are recorded in ``config.rayprune_layer_sizes`` (a list of
``{"kv_heads", "intermediate"}``). When every block keeps the same sizes the config's
own fields are rewritten too, so ``from_pretrained`` reloads the checkpoint; otherwise
:func:`load_structured` rebuilds the model with per-layer sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from orchestrator.engine.blocks import decoder_blocks
from orchestrator.errors import UsageError
from orchestrator.inputs.config import ModelConfig
from orchestrator.inputs.models import SIZES_KEY, TORCH_DTYPES, check_weight_format, load_model
from orchestrator.structured.groups import ModuleGroups, arch_spec, group_index, head_dim, module_groups

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
    for sl in mod.slices:
        owner, attr = _owner(model, sl.name)
        old = getattr(owner, attr)
        idx = group_index(sl, keep)
        new = nn.Parameter(old.data.index_select(sl.dim, idx).contiguous(), requires_grad=old.requires_grad)
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
    if all(s == sizes[0] for s in sizes):
        cfg.num_key_value_heads = sizes[0]["kv_heads"]
        cfg.num_attention_heads = sizes[0]["kv_heads"] * n_rep
        cfg.intermediate_size = sizes[0]["intermediate"]
    for block in decoder_blocks(model):  # keep module attributes honest (forward uses head_dim only)
        attn = getattr(block, arch_spec(model)["attn"]["module"])
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = n_rep
    return sizes


def is_uniform(sizes: list[dict[str, int]]) -> bool:
    """Every block keeps the same sizes."""
    return all(s == sizes[0] for s in sizes)


def save_structured(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Save a shrunk model (safetensors + config with per-layer sizes).

    Returns:
        The directory.
    """
    path = Path(path)
    sync_config(model)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_structured(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint written by :func:`save_structured` (uniform or per-layer sizes).

    Args:
        path: checkpoint directory.
        dtype: parameter dtype.

    Raises:
        UsageError: the directory is not a checkpoint or its weights do not match the sizes.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"structured checkpoint {str(path)!r} has no config.json")
    config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, SIZES_KEY, None)
    if not sizes or is_uniform(sizes):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    n_rep = config.num_attention_heads // config.num_key_value_heads
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hd = head_dim(config)
    spec = arch_spec(model)
    for block, size in zip(decoder_blocks(model), sizes, strict=True):
        widths = {"attn": (size["kv_heads"], {"q_proj": n_rep * hd}), "mlp": (size["intermediate"], {})}
        for kind, (g, special) in widths.items():
            s = spec[kind]
            sub = getattr(block, s["module"])
            for name in s["rows"]:
                lin = getattr(sub, name)
                w = g * special.get(name, hd if kind == "attn" else 1)
                setattr(sub, name, nn.Linear(lin.in_features, w, bias=lin.bias is not None, device="meta",
                                             dtype=dtype))
            for name in s["cols"]:
                lin = getattr(sub, name)
                w = g * (n_rep * hd if kind == "attn" else 1)
                setattr(sub, name, nn.Linear(w, lin.out_features, bias=lin.bias is not None, device="meta",
                                             dtype=dtype))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"structured checkpoint {str(path)!r} has no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k: v.to(dtype) for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise UsageError(f"structured checkpoint {str(path)!r}: weights do not match the sizes ({exc})") from None
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UsageError(f"structured checkpoint {str(path)!r}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if any(buf.is_meta for buf in model.buffers()):  # rotary inv_freq was built on meta
        _reinit_buffers(model, config)
    return model.eval()


def _reinit_buffers(model: nn.Module, config) -> None:
    """Rebuild the rotary embedding (its buffers are not in the checkpoint)."""
    rot_owner = model.get_submodule("model")
    rotary = getattr(rot_owner, "rotary_emb", None)
    if rotary is None:
        raise UsageError("structured checkpoint: cannot rebuild non-persistent buffers (no rotary_emb)")
    rot_owner.rotary_emb = type(rotary)(config=config)


def load_checkpoint(path: str, model_cfg: ModelConfig, dtype: str | None = None) -> nn.Module:
    """Load any checkpoint a run writes or reads: one with per-layer sizes (a SAAP model) through
    :func:`load_structured`, every other through :func:`~orchestrator.inputs.models.load_model`."""
    import json

    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and SIZES_KEY in json.loads(cfg_file.read_text()):
        check_weight_format(path, model_cfg)
        return load_structured(path, TORCH_DTYPES[dtype or model_cfg.dtype]).eval()
    return load_model(path, model_cfg, dtype)
