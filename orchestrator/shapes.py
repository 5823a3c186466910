"""Model shapes the planner reasons about: the parts of a LLaMA-style config, and published shapes.

Pure Python (no torch): parameter counts exactly as ``LlamaForCausalLM`` builds them, and the activation
values a block keeps for its backward (measured: ``tests/unit/test_planner.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

FP32 = 4


def element_bytes(name: str) -> int:
    """Bytes per element of a config dtype name: 4 for ``float32``, 2 for the 16-bit ones."""
    return FP32 if name == "float32" else 2

LLAMA2_13B: dict[str, Any] = {
    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
    "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False,
}  # published Llama-2-13B config
LLAMA2_70B: dict[str, Any] = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
}  # published Llama-2-70B config
LLAMA3_70B: dict[str, Any] = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}  # published Llama-3-70B (and 3.1-70B) config
#: ``rayprune plan --shape NAME``
SHAPES: dict[str, dict[str, Any]] = {"llama2-13b": LLAMA2_13B, "llama2-70b": LLAMA2_70B, "llama3-70b": LLAMA3_70B}


@dataclass(frozen=True)
class ModelShape:
    """The parts of a LLaMA-style config the planner needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """Read a ``PretrainedConfig``-like object or a dict.

        Args:
            cfg: has ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
                ``num_attention_heads``, ``vocab_size``; optional ``num_key_value_heads``
                (default: heads), ``head_dim`` (default: hidden / heads),
                ``tie_word_embeddings`` (default False), ``attention_bias``, ``mlp_bias``.

        Raises:
            ValueError: a required field is missing or not a positive integer.
        """

        def get(name: str, default: Any = None) -> Any:
            val = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
            return default if val is None else val

        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [n for n in required if get(n) is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        shape = cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", heads)),
            vocab=int(get("vocab_size")),
            head_dim=int(get("head_dim", hidden // heads if heads else 0)),
            tied=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
        )
        bad = [k for k, v in asdict(shape).items() if isinstance(v, int) and not isinstance(v, bool) and v <= 0]
        if bad:
            raise ValueError(f"model config fields must be > 0: {', '.join(bad)}")
        return shape

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """``name -> (out, in)`` of the pruned linears of one decoder block."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }

    def block_linear_params(self) -> int:
        """Weights (no biases) of one block's linears: what gradient statistics cover."""
        return sum(o * i for o, i in self.block_linears().values())

    def block_params(self) -> int:
        """All parameters of one decoder block (linears, biases, two RMSNorms)."""
        outs = {n: o for n, (o, _) in self.block_linears().items()}
        bias = self.attention_bias * sum(outs[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        bias += self.mlp_bias * sum(outs[n] for n in ("gate_proj", "up_proj", "down_proj"))
        return self.block_linear_params() + bias + 2 * self.hidden

    def total_params(self) -> int:
        """Parameter count exactly as ``LlamaForCausalLM(cfg).parameters()``."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.block_params() + self.hidden + embed + head

    def activations_per_token(self) -> int:
        """Values autograd keeps per token of one block for its backward (SDPA/flash attention, no ``T x T``).

        Counted from what a LLaMA block saves: its input, the two RMSNorms' normalised inputs and
        outputs, the attention input, ``q`` and ``k`` after RoPE, ``v``, the attention output and its
        log-sum-exp, the residual, and four ``intermediate``-wide MLP tensors (gate, SiLU, up, product).
        """
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 6 * self.hidden + 2 * q + 2 * kv + self.heads + 4 * self.intermediate + 2

    def backward_bytes(self, tokens: int, dtype_bytes: int, checkpoint: bool, compute_bytes: int | None = None
                       ) -> int:
        """Bytes a backward over ``tokens`` tokens holds: every block's activations, or (``checkpoint``) every
        block's input and one block's recomputed activations; plus the fp32 gradient of the final hidden states.

        Under autocast to a narrower ``compute_bytes`` dtype the two RMSNorms' inputs and normalised outputs
        and the attention's log-sum-exp stay in the model dtype; the rest is kept in the compute dtype."""
        narrow = compute_bytes if compute_bytes is not None and compute_bytes < dtype_bytes else dtype_bytes
        wide = 4 * self.hidden + self.heads  # per token and block, in the model dtype
        one_block = tokens * (wide * dtype_bytes + (self.activations_per_token() - wide) * narrow)
        kept = self.layers * tokens * self.hidden * dtype_bytes + one_block if checkpoint else self.layers * one_block
        return kept + tokens * self.hidden * FP32

    def largest_linear(self) -> int:
        """Weights of the largest pruned linear of a block."""
        return max(o * i for o, i in self.block_linears().values())

    def consecutive_linears(self, count: int) -> int:
        """Most weights of ``count`` pruned linears in a row, in backward order across blocks."""
        sizes = [o * i for o, i in self.block_linears().values()][::-1]
        ring = sizes * (count // len(sizes) + 2)
        return max(sum(ring[j : j + count]) for j in range(len(sizes)))

    def xtx_bytes(self) -> int:
        """fp64 ``sum x x^T`` of every linear of one block (one ``in x in`` matrix each, see
        :class:`~orchestrator.pruning.stats.ActivationStats`)."""
        return sum(i * i for _, i in self.block_linears().values()) * 2 * FP32
