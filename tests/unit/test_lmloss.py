"""The logits-free causal-LM loss against HF's loss and autograd on a tiny LLaMA."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.pruning.lmloss import chunked_lm_loss, lm_loss_with_grad, plain_head


def _tiny(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def test_loss_and_hidden_grad_equal_a_plain_log_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 5, generator=g)  # (B, T, H)
    weight = torch.randn(11, 5, generator=g)  # (V, H)
    bias = torch.randn(11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    h = hidden.clone().requires_grad_()
    logp = torch.log_softmax(h[:, :-1] @ weight.T + bias, dim=-1)  # (B, T-1, V)
    per_seq = -logp.gather(2, ids[:, 1:, None]).squeeze(2).mean(1)  # (B,)
    per_seq.sum().backward()
    for chunk in (1, 11, 40, 10_000):  # one row per chunk, ..., everything at once
        loss, grad = chunked_lm_loss(hidden, weight, ids, bias, chunk_elements=chunk)
        assert math.isclose(loss.item(), per_seq.sum().item(), rel_tol=1e-6)
        torch.testing.assert_close(grad, h.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[:, -1] == 0)  # the last position predicts nothing


@pytest.mark.parametrize("tie", [True, False])
def test_backward_matches_hf_loss_times_batch(tie: bool) -> None:
    model = _tiny(tie)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    ref = model(ids, labels=ids, use_cache=False).loss * ids.shape[0]
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if ".layers." in n}
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    loss = lm_loss_with_grad(hidden, model.lm_head.weight, ids, chunk_elements=900)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if ".layers." in n}
    assert want.keys() == got.keys() and len(got) == 18
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)


def test_plain_head_detects_softcapping_and_scaling() -> None:
    cfg = LlamaConfig()
    assert plain_head(cfg)
    cfg.final_logit_softcapping = 30.0
    assert not plain_head(cfg)
    cfg.final_logit_softcapping = None
    cfg.logit_scale = 0.0625
    assert not plain_head(cfg)


def test_rejects_a_single_position() -> None:
    with pytest.raises(ValueError, match="at least 2 positions"):
        chunked_lm_loss(torch.zeros(1, 1, 4), torch.zeros(3, 4), torch.zeros(1, 1, dtype=torch.long))


def test_confident_positions_are_more_accurate_than_fp32_log_softmax() -> None:
    # a peaked distribution: every target logit ~12 above the rest, p_target ~ 1 - 4e-4,
    # where fp32 p_target - 1 cancels
    g = torch.Generator().manual_seed(3)
    weight = 4.0 * torch.eye(64) + 0.05 * torch.randn(64, 64, generator=g)  # (V, H), V = H
    ids = torch.randint(0, 64, (1, 9), generator=g)
    hidden = 0.05 * torch.randn(1, 9, 64, generator=g)
    hidden[0, :-1] += 3.0 * torch.nn.functional.one_hot(ids[0, 1:], 64)  # each position points at its target
    h64 = hidden.double().requires_grad_()
    logp = torch.log_softmax(h64[:, :-1] @ weight.double().T, dim=-1)
    (-logp.gather(2, ids[:, 1:, None]).mean()).backward()
    exact = h64.grad
    assert torch.exp(logp.gather(2, ids[:, 1:, None])).min() > 0.99
    h32 = hidden.clone().requires_grad_()
    lp32 = torch.log_softmax(h32[:, :-1] @ weight.T, dim=-1)
    (-lp32.gather(2, ids[:, 1:, None]).mean()).backward()
    _, ours = chunked_lm_loss(hidden, weight, ids)

    def err(g: torch.Tensor) -> float:
        return ((g.double() - exact).abs().amax(-1) / exact.abs().amax(-1).clamp_min(1e-30))[0, :-1].max().item()

    assert err(ours) < 1e-4
    assert err(ours) < err(h32.grad) / 10
