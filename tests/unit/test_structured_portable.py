"""Structured checkpoints every serving stack loads, for the architectures people prune.

Seeded tiny random configs of each architecture: groups removed per layer, the shrunk model's
logits equal the zeroed-but-unshrunk model's, the checkpoint reloads through rayprune's loader and
through plain transformers in a process where rayprune cannot be imported (the modeling code
travels with the checkpoint), with the same logits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from orchestrator.errors import UsageError
from orchestrator.structured.groups import module_groups
from orchestrator.structured.portable import CLASS_NAME, MODULE_NAME, SIZES_KEY
from orchestrator.structured.shrink import keep_groups, load_structured, save_structured, sync_config, zero_groups

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, head_dim=16)


def build(arch: str):
    """A seeded tiny random model of ``arch`` (non-zero biases and norms, so shrinking them shows)."""
    import transformers as tf

    torch.manual_seed(3)
    make = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, tie_word_embeddings=False)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, tie_word_embeddings=False)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON, sliding_window=8)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, sliding_window=8)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**{k: v for k, v in COMMON.items() if k != "head_dim"},
                                                        pad_token_id=0)),
    }[arch]
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    return model


ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
# per block: (KV groups dropped, MLP channels dropped): a different size in every block
DROPS = [(torch.tensor([0]), torch.arange(0, 40, 3)), (torch.tensor([], dtype=torch.long), torch.arange(5, 30)),
         (torch.tensor([1]), torch.tensor([], dtype=torch.long))]


def shrink_and_mask(arch: str):
    model, masked = build(arch), build(arch)
    for mod, ref in zip(module_groups(model), module_groups(masked), strict=True):
        drop = DROPS[mod.layer][0 if mod.kind == "attn" else 1]
        keep = torch.tensor([g for g in range(mod.num_groups) if g not in set(drop.tolist())], dtype=torch.long)
        keep_groups(model, mod, keep)
        zero_groups(masked, ref, drop)
    sync_config(model)
    return model, masked


@pytest.mark.parametrize("arch", ARCHS)
def test_shrunk_equals_masked_and_reloads(arch, tmp_path):
    model, masked = shrink_and_mask(arch)
    with torch.no_grad():
        shrunk, zeroed = model(IDS).logits, masked(IDS).logits
    torch.testing.assert_close(shrunk, zeroed, rtol=0, atol=1e-5)
    save_structured(model, tmp_path)
    sizes = json.loads((tmp_path / "config.json").read_text())[SIZES_KEY]
    assert [s["kv_heads"] for s in sizes] == [1, 2, 1] and [s["intermediate"] for s in sizes] == [26, 15, 40]
    again = load_structured(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, shrunk, rtol=0, atol=0)
        out = again.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)  # KV cache with per-layer heads
    assert out.shape == (1, 8)


PLAIN_LOAD = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("orchestrator", "actors"):
            raise ImportError(f"{name} is not importable here")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
try:
    import orchestrator  # noqa: F401
    sys.exit("rayprune is importable: the test would prove nothing")
except ImportError:
    pass
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print("LOGITS " + json.dumps(model(ids).logits.tolist()))
"""


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_per_layer_checkpoint_loads_with_plain_transformers(arch, tmp_path):
    model, _ = shrink_and_mask(arch)
    save_structured(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModelForCausalLM": f"{MODULE_NAME}.{CLASS_NAME}"}
    assert (tmp_path / f"{MODULE_NAME}.py").is_file()
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path), json.dumps(IDS.tolist())],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOGITS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    plain = torch.tensor(json.loads(lines[0][len("LOGITS "):]))
    with torch.no_grad():
        ours = load_structured(tmp_path)(IDS).logits
    torch.testing.assert_close(plain, ours, rtol=0, atol=1e-6)


def test_uniform_sizes_give_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("qwen3")
    for mod in module_groups(model):
        keep_groups(model, mod, torch.arange(1 if mod.kind == "attn" else 20))
    save_structured(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / f"{MODULE_NAME}.py").exists()
    assert cfg["num_key_value_heads"] == 1 and cfg["intermediate_size"] == 20
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_fused_projections_are_grouped_segment_by_segment():
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: a group spans one segment of each."""
    model = build("phi3")
    attn, mlp = module_groups(model)[:2]
    qkv = [sl for sl in attn.slices if sl.name.endswith("qkv_proj.weight")]
    # 4 query heads over 2 KV heads of width 16: q rows 0..63 (32 per group), k 64..95, v 96..127
    assert [(sl.offset, sl.width, sl.groups) for sl in qkv] == [(0, 32, 2), (64, 16, 2), (96, 16, 2)]
    assert attn.num_groups == 2 and mlp.num_groups == 40
    weight = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()  # (128, 64)
    keep_groups(model, attn, torch.tensor([1]))
    kept = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(kept, torch.cat([weight[32:64], weight[80:96], weight[112:128]]))


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UsageError, match="gpt2"):
        module_groups(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
