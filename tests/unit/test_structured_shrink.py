"""Coupled groups, physical shrinking and checkpoint round trips (structured pruning)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama
from orchestrator.structured.groups import decoder_params, module_groups
from orchestrator.structured.shrink import (
    SIZES_KEY,
    keep_groups,
    load_structured,
    save_structured,
    sync_config,
    zero_groups,
)


def tiny(kv_heads: int = 2, heads: int = 4, layers: int = 2):
    return build_tiny_llama(TinyModelConfig(layers=layers, hidden=64, heads=heads, kv_heads=kv_heads,
                                            intermediate=48, seed=1))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases so shrinking them is visible
        for p in model.parameters():
            if p.ndim == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.5)
    return model


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def test_groups_describe_gqa_rows_and_columns():
    model = tiny(kv_heads=2)
    mods = module_groups(model)
    assert [m.key for m in mods] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    attn, mlp = mods[0], mods[1]
    assert attn.num_groups == 2 and mlp.num_groups == 48
    widths = {s.name.split(".")[-2]: (s.dim, s.width) for s in attn.slices}
    # head_dim 16, n_rep 2: a group is 32 query rows, 16 k/v rows, 32 o_proj columns
    assert widths == {"q_proj": (0, 32), "k_proj": (0, 16), "v_proj": (0, 16), "o_proj": (1, 32)}
    assert attn.group_params == (32 + 16 + 16 + 32) * 64
    assert mlp.group_params == 3 * 64
    assert sum(m.params for m in mods) == decoder_params(model) - 2 * 2 * 64  # minus the norms


def test_removing_a_group_removes_exactly_its_rows_and_columns():
    model = tiny(kv_heads=2)
    attn = model.model.layers[0].self_attn
    q, k, o = attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.o_proj.weight.clone()
    mods = module_groups(model)
    keep_groups(model, mods[0], torch.tensor([1]))
    assert torch.equal(attn.q_proj.weight, q[32:64])
    assert torch.equal(attn.k_proj.weight, k[16:32])
    assert torch.equal(attn.o_proj.weight, o[:, 32:64])
    mlp = model.model.layers[1].mlp
    gate, down = mlp.gate_proj.weight.clone(), mlp.down_proj.weight.clone()
    keep_groups(model, mods[3], torch.tensor([7, 2, 40]))
    assert torch.equal(mlp.gate_proj.weight, gate[[2, 7, 40]])
    assert torch.equal(mlp.down_proj.weight, down[:, [2, 7, 40]])
    assert mlp.gate_proj.out_features == 3 and mlp.down_proj.in_features == 3


@pytest.mark.parametrize("make", [lambda: tiny(kv_heads=2), lambda: tiny(kv_heads=4), tiny_qwen2],
                         ids=["llama-gqa", "llama-mha", "qwen2-bias"])
def test_shrunk_equals_masked(make):
    model, masked = make(), make()
    drops = {0: torch.tensor([0]), 1: torch.arange(0, 40, 3), 2: torch.tensor([1]), 3: torch.arange(5, 30)}
    for j, (mod, mod_m) in enumerate(zip(module_groups(model), module_groups(masked), strict=True)):
        keep = torch.tensor([g for g in range(mod.num_groups) if g not in set(drops[j].tolist())])
        keep_groups(model, mod, keep)
        zero_groups(masked, mod_m, drops[j])
    sync_config(model)
    with torch.no_grad():
        a, b = model(IDS).logits, masked(IDS).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert decoder_params(model) < decoder_params(masked)


def test_qwen2_biases_are_shrunk():
    model = tiny_qwen2()
    bias = model.model.layers[0].self_attn.k_proj.bias.clone()
    keep_groups(model, module_groups(model)[0], torch.tensor([1]))
    assert torch.equal(model.model.layers[0].self_attn.k_proj.bias, bias[16:])


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UsageError, match="gpt2"):
        module_groups(model)


def _shrink(model, per_layer: list[tuple[int, int]]):
    for mod in module_groups(model):
        kv, inter = per_layer[mod.layer]
        n = kv if mod.kind == "attn" else inter
        keep_groups(model, mod, torch.arange(mod.num_groups - n, mod.num_groups))
    sync_config(model)


def test_uniform_round_trip_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(kv_heads=2)
    _shrink(model, [(1, 24), (1, 24)])
    save_structured(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_key_value_heads == 1 and again.config.intermediate_size == 24
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)


def test_nonuniform_round_trip_through_load_structured(tmp_path):
    model = tiny(kv_heads=2, layers=3)
    _shrink(model, [(2, 48), (1, 16), (1, 32)])
    save_structured(model, tmp_path)
    again = load_structured(tmp_path)
    assert getattr(again.config, SIZES_KEY)[1] == {"kv_heads": 1, "intermediate": 16}
    assert again.model.layers[1].mlp.up_proj.weight.shape == (16, 64)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)
        out = again.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)  # KV cache with per-layer heads
    assert out.shape == (1, 9)
