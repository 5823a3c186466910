"""Decoders whose blocks keep different numbers of attention groups and MLP channels.

A SAAP model with per-layer sizes is a normal Hugging Face architecture (``llama``, ``qwen3``,
``gemma3_text``, ...) whose attention and MLP projections are narrower in some blocks. This module
builds such a model: the architecture's own class, then every block's projections resized to the
sizes recorded in its config. It imports only torch and transformers, because it also travels
*inside* each per-layer checkpoint as ``modeling_rayprune.py`` (Hugging Face's remote-code
convention): ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads the
checkpoint where rayprune is not installed, and so can serving stacks that run Transformers models
(vLLM's Transformers backend, TGI with remote code). rayprune itself loads the same class from this
module, never code from a checkpoint directory.

The config carries two keys next to the architecture's own fields:

* ``rayprune_layer_sizes``: per block ``{"kv_heads": int, "intermediate": int}``;
* ``rayprune_structure``: which projections hold the groups, per kind
  ``{"module": "self_attn", "rows": [...], "cols": [...]}`` (``attn`` and ``mlp``).

The attention keeps the model's ratio of query heads to KV heads (a group is one KV head with its
query heads) and its head width, so the architecture's own forward runs unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SIZES_KEY = "rayprune_layer_sizes"
STRUCTURE_KEY = "rayprune_structure"
CLASS_NAME = "RaypruneForCausalLM"
MODULE_NAME = "modeling_rayprune"


def _blocks(model: nn.Module) -> nn.ModuleList:
    n = model.config.num_hidden_layers
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def set_attention_sizes(attn: nn.Module, config, kv_heads: int, uniform: bool) -> None:
    """Tell one attention module how many heads it keeps (the ratio of query to KV heads stays).

    Most architectures reshape with ``-1`` heads and need nothing; those that slice a fused
    projection by head counts (Phi-3) read them from their attributes or their config, so a block
    of its own size gets its own shallow copy of the config.
    """
    n_rep = config.num_attention_heads // config.num_key_value_heads
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = n_rep
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = kv_heads
    if hasattr(attn, "num_heads"):
        attn.num_heads = kv_heads * n_rep
    if not uniform and getattr(attn, "config", None) is not None:
        own = copy.copy(config)
        own.num_key_value_heads, own.num_attention_heads = kv_heads, kv_heads * n_rep
        attn.config = own


def _row_width(entry, kind: str, first: bool, n_rep: int, hd: int) -> tuple[str, int]:
    """``(name, width per group)`` of a row-grouped projection (fused ones hold several segments)."""
    units = {"q": n_rep * hd, "kv": hd, "one": 1}
    if not isinstance(entry, str):
        name, segments = entry
        return name, sum(units[seg] for seg in segments)
    if kind == "mlp":
        return entry, 1
    return entry, n_rep * hd if first else hd


def resize_blocks(model: nn.Module) -> None:
    """Replace each block's grouped projections by ones of its recorded size (new, uninitialised weights
    on the device and dtype of the old ones: ``from_pretrained`` then loads the checkpoint into them)."""
    config = model.config
    sizes, spec = getattr(config, SIZES_KEY), getattr(config, STRUCTURE_KEY)
    n_rep = config.num_attention_heads // config.num_key_value_heads
    hd = _head_dim(config)
    for block, size in zip(_blocks(model), sizes, strict=True):
        for kind, groups in (("attn", size["kv_heads"]), ("mlp", size["intermediate"])):
            part = getattr(block, spec[kind]["module"])
            for j, entry in enumerate(spec[kind]["rows"]):  # output rows: q has n_rep heads per group, k and v one
                name, width = _row_width(entry, kind, j == 0, n_rep, hd)
                old = getattr(part, name)
                setattr(part, name, nn.Linear(old.in_features, groups * width, bias=old.bias is not None,
                                              device=old.weight.device, dtype=old.weight.dtype))
            for name in spec[kind]["cols"]:  # input columns: o_proj sees every query head of a group
                width = n_rep * hd if kind == "attn" else 1
                old = getattr(part, name)
                setattr(part, name, nn.Linear(groups * width, old.out_features, bias=old.bias is not None,
                                              device=old.weight.device, dtype=old.weight.dtype))
            if kind == "attn":
                set_attention_sizes(part, config, groups, uniform=False)


def portable_class(model_type: str) -> type:
    """The architecture's causal-LM class with per-layer sizes (a subclass named ``RaypruneForCausalLM``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} has no causal-LM class in transformers")
    base = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])

    def __init__(self, config) -> None:  # noqa: N807 - the class's constructor
        base.__init__(self, config)
        resize_blocks(self)

    return type(CLASS_NAME, (base,), {"__init__": __init__, "__module__": __name__})


def shipped_source(model_type: str) -> str:
    """The text of ``modeling_rayprune.py`` for a checkpoint of ``model_type``: this module, plus the class."""
    from pathlib import Path

    return (Path(__file__).read_text()
            + f"\n\n{CLASS_NAME} = portable_class({model_type!r})\n")


def load_portable(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a per-layer checkpoint with this module's class (no code from the checkpoint runs)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return portable_class(config.model_type).from_pretrained(path, config=config, dtype=dtype,
                                                             use_safetensors=True).eval()
