"""Depth pruning: block influence, removal, and a plain transformers checkpoint after it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.engine.blocks import decoder_blocks
from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama
from orchestrator.structured.depth import block_influence, least_influential, remove_blocks

IDS = torch.randint(0, 257, (3, 20), generator=torch.Generator().manual_seed(1))  # (N, L)


def _tiny():
    return build_tiny_llama(TinyModelConfig(layers=5, hidden=64, heads=4, kv_heads=2, intermediate=96, seed=4))


def _skipping(model, drop: set[int]):
    """The dense model with the given blocks turned into the identity (a forward hook returns their input)."""
    handles = []
    for i, block in enumerate(decoder_blocks(model)):
        if i in drop:
            def hook(_mod, args, kwargs, out):
                hidden = args[0] if args else kwargs["hidden_states"]
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
    return handles


def test_the_shrunk_model_is_the_dense_one_with_the_blocks_skipped(tmp_path):
    dense = _tiny()
    drop = [1, 3]
    shrunk = copy.deepcopy(dense)
    remove_blocks(shrunk, drop)
    assert shrunk.config.num_hidden_layers == 3 and len(decoder_blocks(shrunk)) == 3
    handles = _skipping(dense, set(drop))
    try:
        want = dense(IDS).logits
    finally:
        for h in handles:
            h.remove()
    got = shrunk(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, dense(IDS).logits, atol=1e-3)  # the blocks did something
    shrunk.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(IDS).logits, got, atol=1e-5, rtol=0)
    # generation with a KV cache: every kept block writes its own cache slot
    gen_a = shrunk.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False)
    gen_b = again.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen_a, gen_b)
    with torch.no_grad():  # the cached decode equals a full forward of the generated sequence
        full = again(gen_b[:, :-1]).logits[0, -1].argmax()
    assert int(full) == int(gen_b[0, -1])


def test_block_influence_matches_the_hidden_states_of_a_plain_forward():
    model = _tiny()
    got = block_influence(model, IDS)
    with torch.no_grad():
        hs = model(IDS, output_hidden_states=True).hidden_states  # n + 1 states, the last after the final norm
    for i in range(model.config.num_hidden_layers - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert float(got[i]) == pytest.approx(1 - float(cos.mean()), rel=1e-4, abs=1e-6)


def test_least_influential_picks_the_smallest_in_block_order():
    assert least_influential(torch.tensor([0.5, 0.1, 0.9, 0.05, 0.3]), 2) == [1, 3]
    with pytest.raises(ValueError, match="structured.depth_blocks"):
        least_influential(torch.tensor([0.5, 0.1]), 2)
