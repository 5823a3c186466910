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
        "count": ("k_proj", "head_dim", "out"),  # groups = k_proj.out_features / head_dim
    },
    "mlp": {
        "module": "mlp",
        "rows": ("gate_proj", "up_proj"),
        "cols": ("down_proj",),
        "count": ("gate_proj", "one", "out"),  # groups = gate_proj.out_features
    },
}

#: Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: one matrix holding
#: several segments, each with G groups (``q``: n_rep heads per group, ``kv``: one head, ``one``: a row)
_PHI3_SPEC: dict = {
    "attn": {"module": "self_attn", "rows": (("qkv_proj", ("q", "kv", "kv")),), "cols": ("o_proj",),
             "count": ("o_proj", "q", "in")},
    "mlp": {"module": "mlp", "rows": (("gate_up_proj", ("one", "one")),), "cols": ("down_proj",),
            "count": ("down_proj", "one", "in")},
}

#: Module-name specs per ``config.model_type``. Qwen2 carries q/k/v biases: any bias of a
#: row-grouped projection is shrunk with its rows (detected from the module itself).
ARCH_SPECS: dict[str, dict] = {
    **{name: _LLAMA_SPEC for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": _PHI3_SPEC,
}
KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class TensorSlice:
    """Where the groups of one module sit inside one parameter.

    Attributes:
        name: full parameter name (``model.layers.3.self_attn.q_proj.weight``).
        dim: axis along which the groups are laid out.
        width: entries per group along ``dim``.
        offset: start of the segment along ``dim``.
        groups: number of groups of the segment (0: it spans the whole axis).
    """

    name: str
    dim: int
    width: int
    offset: int = 0  # where this segment starts along ``dim`` (fused matrices hold several)
    groups: int = 0  # G (0: the whole axis is this slice's groups)

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This slice's segment of ``t`` (``t`` itself when the slice spans the whole axis)."""
        return t if not self.groups else t.narrow(self.dim, self.offset, self.groups * self.width)


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
    units = {"head_dim": hd, "kv": hd, "q": hd * n_rep_of(model.config), "one": 1}
    out: list[ModuleGroups] = []
    for i, block in enumerate(blocks):
        for kind in KINDS:
            s = spec[kind]
            where = f"{prefix}.{i}"
            name, unit, axis = s["count"]
            count_lin = _linear(block, s["module"], name, where)
            g = (count_lin.out_features if axis == "out" else count_lin.in_features) // units[unit]
            mod = f"{where}.{s['module']}"
            slices = []
            for entry in s["rows"]:
                name, segments = (entry, None) if isinstance(entry, str) else entry
                lin = _linear(block, s["module"], name, where)
                for suffix in ("weight", "bias") if lin.bias is not None else ("weight",):
                    if segments is None:
                        slices.append(TensorSlice(f"{mod}.{name}.{suffix}", 0, lin.out_features // g))
                        continue
                    offset = 0
                    for seg in segments:
                        slices.append(TensorSlice(f"{mod}.{name}.{suffix}", 0, units[seg], offset, g))
                        offset += g * units[seg]
            for name in s["cols"]:
                lin = _linear(block, s["module"], name, where)
                slices.append(TensorSlice(f"{mod}.{name}.weight", 1, lin.in_features // g))
            params = dict(block.named_parameters())
            local = len(where) + 1
            group_params = sum(params[sl.name[local:]].numel() // params[sl.name[local:]].shape[sl.dim] * sl.width
                               for sl in slices)
            protected = i < protect_first or i >= len(blocks) - protect_last
            out.append(ModuleGroups(i, kind, mod, g, slices, group_params, protected))
    return out


def n_rep_of(config) -> int:
    """Query heads per KV head (a structured group is one KV head with its query heads)."""
    return config.num_attention_heads // config.num_key_value_heads


def group_index(sl: TensorSlice, groups: torch.Tensor) -> torch.Tensor:
    """Indices along ``sl.dim`` covered by the given groups.

    Args:
        sl: the tensor slice.
        groups: ``(k,)`` int64 group ids.

    Returns:
        ``(k * width,)`` int64, group-major.
    """
    offs = torch.arange(sl.width, dtype=torch.long)
    return sl.offset + (groups.long()[:, None] * sl.width + offs[None, :]).reshape(-1)


def decoder_params(model: nn.Module) -> int:
    """Parameters inside the decoder blocks (what the structured target refers to)."""
    return sum(p.numel() for p in decoder_blocks(model).parameters())
