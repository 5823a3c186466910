"""Coupled structure groups of LLaMA-family decoders, described by data.

A *module* is the attention or the MLP of one decoder block. It holds ``G`` groups
that must be removed together:

- attention: one KV head and the ``n_rep = heads / kv_heads`` query heads sharing it:
  rows of ``q_proj`` (``n_rep * head_dim`` per group), ``k_proj`` and ``v_proj``
  (``head_dim`` each), their biases when present, and the matching input columns of
  ``o_proj``;
- MLP: one intermediate channel: a row of ``gate_proj`` and ``up_proj`` and a column
  of ``down_proj``.

Group ``g`` of a tensor occupies indices ``[g * width, (g + 1) * width)`` along its
axis; widths come from the tensor shapes, so the same description fits models that
were already shrunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.engine.blocks import block_prefix, decoder_blocks
from orchestrator.errors import UsageError

_LLAMA_SPEC: dict = {
    "attn": {
        "module": "self_attn",
        "rows": ("q_proj", "k_proj", "v_proj"),  # output rows (and biases) grouped
        "cols": ("o_proj",),  # input columns grouped
        "count": ("k_proj", "head_dim"),  # groups = k_proj.out_features / head_dim
    },
    "mlp": {
        "module": "mlp",
        "rows": ("gate_proj", "up_proj"),
        "cols": ("down_proj",),
        "count": ("gate_proj", None),  # groups = gate_proj.out_features
    },
}

#: Module-name specs per ``config.model_type``. Qwen2 carries q/k/v biases: any bias of a
#: row-grouped projection is shrunk with its rows (detected from the module itself).
ARCH_SPECS: dict[str, dict] = {name: _LLAMA_SPEC for name in (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")}
KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class TensorSlice:
    """Where the groups of one module sit inside one parameter.

    Attributes:
        name: full parameter name (``model.layers.3.self_attn.q_proj.weight``).
        dim: axis along which the groups are laid out.
        width: entries per group along ``dim``.
    """

    name: str
    dim: int
    width: int


@dataclass
class ModuleGroups:
    """The groups of one module (attention or MLP of one block).

    Attributes:
        layer: block index.
        kind: ``"attn"`` or ``"mlp"``.
        prefix: full module name (``model.layers.3.mlp``).
        num_groups: ``G``.
        slices: every grouped tensor.
        group_params: parameters one group holds (all its slices together).
        protected: never pruned (first / last blocks).
    """

    layer: int
    kind: str
    prefix: str
    num_groups: int
    slices: list[TensorSlice] = field(default_factory=list)
    group_params: int = 0
    protected: bool = False

    @property
    def params(self) -> int:
        """Parameters in all groups of the module."""
        return self.num_groups * self.group_params

    @property
    def key(self) -> str:
        """Short id, e.g. ``"12.mlp"``."""
        return f"{self.layer}.{self.kind}"


def arch_spec(model: nn.Module) -> dict:
    """The module-name spec of the model's architecture.

    Raises:
        UsageError: the ``model_type`` has no spec.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCH_SPECS:
        raise UsageError(
            f"structured.enabled: model_type {model_type!r} has no group spec "
            f"(supported: {', '.join(sorted(ARCH_SPECS))}); add an entry to "
            "orchestrator.structured.groups.ARCH_SPECS naming its attention/MLP projections"
        )
    return ARCH_SPECS[model_type]


def head_dim(config) -> int:
    """Per-head width of the attention (``config.head_dim`` or ``hidden / heads``)."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def _linear(block: nn.Module, module: str, name: str, where: str) -> nn.Linear:
    sub = getattr(getattr(block, module, None), name, None)
    if not isinstance(sub, nn.Linear):
        found = "nothing" if sub is None else type(sub).__name__
        raise UsageError(f"structured.enabled: projection {where}.{module}.{name} is missing or not a Linear "
                         f"(found {found})")
    return sub


def module_groups(model: nn.Module, protect_first: int = 0, protect_last: int = 0) -> list[ModuleGroups]:
    """Describe every prunable module of the model, in block order (attention, then MLP).

    Args:
        model: a LLaMA / Mistral / Qwen2-style causal LM (possibly already shrunk).
        protect_first: blocks at the start marked protected.
        protect_last: blocks at the end marked protected.

    Raises:
        UsageError: unsupported architecture or a missing projection.
    """
    spec = arch_spec(model)
    prefix = block_prefix(model)
    blocks = decoder_blocks(model)
    hd = head_dim(model.config)
    out: list[ModuleGroups] = []
    for i, block in enumerate(blocks):
        for kind in KINDS:
            s = spec[kind]
            where = f"{prefix}.{i}"
            count_lin = _linear(block, s["module"], s["count"][0], where)
            unit = hd if s["count"][1] == "head_dim" else 1
            g = count_lin.out_features // unit
            mod = f"{where}.{s['module']}"
            slices = []
            for name in s["rows"]:
                lin = _linear(block, s["module"], name, where)
                slices.append(TensorSlice(f"{mod}.{name}.weight", 0, lin.out_features // g))
                if lin.bias is not None:
                    slices.append(TensorSlice(f"{mod}.{name}.bias", 0, lin.out_features // g))
            for name in s["cols"]:
                lin = _linear(block, s["module"], name, where)
                slices.append(TensorSlice(f"{mod}.{name}.weight", 1, lin.in_features // g))
            params = dict(block.named_parameters())
            local = len(where) + 1
            group_params = sum(
                params[sl.name[local:]].numel() // g for sl in slices
            )
            protected = i < protect_first or i >= len(blocks) - protect_last
            out.append(ModuleGroups(i, kind, mod, g, slices, group_params, protected))
    return out


def group_index(sl: TensorSlice, groups: torch.Tensor) -> torch.Tensor:
    """Indices along ``sl.dim`` covered by the given groups.

    Args:
        sl: the tensor slice.
        groups: ``(k,)`` int64 group ids.

    Returns:
        ``(k * width,)`` int64, group-major.
    """
    offs = torch.arange(sl.width, dtype=torch.long)
    return (groups.long()[:, None] * sl.width + offs[None, :]).reshape(-1)


def decoder_params(model: nn.Module) -> int:
    """Parameters inside the decoder blocks (what the structured target refers to)."""
    return sum(p.numel() for p in decoder_blocks(model).parameters())
