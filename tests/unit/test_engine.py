"""The single-process engine against straightforward reimplementations on a tiny LLaMA."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from orchestrator.engine.blocks import block_linears, decoder_blocks
from orchestrator.engine.local import (
    block_sequential,
    causal_lm_loss,
    gradient_pass,
    logits_free,
    pruned_weight_names,
    run_local,
)
from orchestrator.inputs.config import TinyModelConfig
from orchestrator.inputs.data import generate_windows, sample_windows
from orchestrator.inputs.loader import load_config
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
from orchestrator.pruning.masks import row_mask
from orchestrator.pruning.scores import gblm_score, wanda_score
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(TinyModelConfig(**TINY))


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (5, 24), generator=g)


def _pcfg(**kw):
    return load_config(None, [f"pruning.{k}={v}" for k, v in kw.items()]).pruning


def test_gradient_pass_equals_per_sequence_autograd(tiny, ids):
    """Against HF's loss and autograd in float64, one sequence at a time.

    The reference is float64 because the fp32 HF loss is itself only accurate to ~1e-6 of the
    largest entry (signed sums cancel), which is also the bound the engine is held to.
    """
    model = copy.deepcopy(tiny)
    sums = gradient_pass(model, ids, ("abs", "sq", "sum"), scale=100.0, progress=False)
    names = pruned_weight_names(model)
    ref_model = copy.deepcopy(tiny).double()
    params = dict(ref_model.named_parameters())
    ref = {n: {k: torch.zeros_like(params[n]) for k in ("abs", "sq", "sum")} for n in names}
    for i in range(ids.shape[0]):
        x = ids[i : i + 1]
        loss = ref_model(x, labels=x).loss
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            g = g * 100.0
            ref[n]["abs"] += g.abs()
            ref[n]["sq"] += g * g
            ref[n]["sum"] += g
    for n in names:
        for k in ("abs", "sq", "sum"):
            want = ref[n][k].float()
            torch.testing.assert_close(sums[n][k], want, rtol=1e-4, atol=2e-6 * float(want.abs().max()),
                                       msg=f"{n} {k}")
    assert all(p.grad is None for p in model.parameters())


def test_bf16_gradient_pass_stays_close_to_fp32(tiny, ids):
    """``gblm.grad_dtype: bfloat16`` runs the forward/backward under bf16 autocast (the statistics stay fp32):
    every statistic is fp32, differs from the fp32 pass (so autocast really ran) and stays within bf16 error."""
    fp32 = gradient_pass(copy.deepcopy(tiny), ids, ("abs",), scale=100.0, progress=False)
    bf16 = gradient_pass(copy.deepcopy(tiny), ids, ("abs",), scale=100.0, progress=False, dtype="bfloat16")
    assert any(not torch.equal(bf16[n]["abs"], fp32[n]["abs"]) for n in fp32)
    for n, by_kind in fp32.items():
        got, want = bf16[n]["abs"], by_kind["abs"]
        assert got.dtype == torch.float32, n
        assert float((got - want).norm() / want.norm()) < 0.05, n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointed_gradient_pass_gives_the_same_statistics(tiny, ids, dtype):
    """Recomputing each block in the backward changes no statistic (rtol 1e-5), the blocks' own
    ``forward`` is restored afterwards, and the pass really recomputed: each block ran twice per sequence."""
    kinds = ("abs", "sq", "sum")
    plain = gradient_pass(copy.deepcopy(tiny), ids, kinds, scale=100.0, progress=False, dtype=dtype)
    model = copy.deepcopy(tiny)
    calls = []
    handles = [b.self_attn.register_forward_hook(lambda *_: calls.append(1)) for b in decoder_blocks(model)]
    ckpt = gradient_pass(model, ids, kinds, scale=100.0, progress=False, dtype=dtype, checkpoint=True)
    for h in handles:
        h.remove()
    assert len(calls) == 2 * len(decoder_blocks(model)) * ids.shape[0]  # every block ran again in the backward
    assert all("forward" not in vars(b) for b in decoder_blocks(model))
    for n, by_kind in plain.items():
        for k, want in by_kind.items():
            torch.testing.assert_close(ckpt[n][k], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                                       msg=f"{n} {k}")


def test_checkpointing_keeps_only_block_inputs_for_the_backward(tiny, ids):
    """What autograd saves for the backward of one sequence: with checkpointing, only each block's input
    ``(1, T, H)`` (plus the loss's and the final norm's few tensors), far less than every activation."""
    from orchestrator.engine.checkpointing import checkpointed_blocks

    def saved_bytes(checkpoint: bool) -> int:
        model = copy.deepcopy(tiny)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with checkpointed_blocks(model, checkpoint), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(model, ids[:1])
        return total

    plain, ckpt = saved_bytes(False), saved_bytes(True)
    hidden = ids.shape[1] * tiny.config.hidden_size * 4  # one block input, fp32
    blocks = len(decoder_blocks(tiny))
    assert ckpt < plain / 10, (ckpt, plain)
    # the block inputs, and a few hidden-sized tensors around the final norm and the loss
    assert blocks * hidden <= ckpt <= (blocks + 5) * hidden, (ckpt, hidden)


def test_causal_lm_loss_skips_logits_only_for_a_plain_head(tiny, ids):
    model = copy.deepcopy(tiny)
    hf = model(ids, labels=ids, use_cache=False).loss * ids.shape[0]
    assert logits_free(model)
    assert causal_lm_loss(model, ids).item() == pytest.approx(hf.item(), rel=1e-5)
    model.config.logit_scale = 0.5  # a head that scales its logits: the model's own loss must be used
    assert not logits_free(model)
    assert torch.equal(causal_lm_loss(model, ids), hf)


def _naive_block_stats(model, ids, block_idx):
    """act_sq of every linear in block ``block_idx`` from full-model forwards, one sequence at a time."""
    linears = block_linears(decoder_blocks(model)[block_idx])
    acc = {n: torch.zeros(lin.in_features) for n, lin in linears.items()}

    def fold(name):
        def hook(_mod, args, _out):
            acc[name].add_(args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0))

        return hook

    hooks = [lin.register_forward_hook(fold(n)) for n, lin in linears.items()]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    for h in hooks:
        h.remove()
    return acc


@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_block_pass_matches_naive_reference(tiny, ids, sequential):
    model = copy.deepcopy(tiny)
    cfg = _pcfg(method="wanda", sparsity=0.5, sequential=sequential)
    out = block_sequential(model, ids, cfg, progress=False)

    ref = copy.deepcopy(tiny)
    dense = copy.deepcopy(tiny)
    n = ids.shape[0]
    agree = total = 0
    for b, block in enumerate(decoder_blocks(ref)):
        # sequential: statistics of block b see the already-pruned blocks < b; otherwise the dense model
        acc = _naive_block_stats(ref if sequential else dense, ids, b)
        for name, lin in block_linears(block).items():
            score = wanda_score(lin.weight, torch.sqrt(acc[name] / n))
            mask = row_mask(score, 0.5)
            lin.weight.data[mask] = 0
            got = out.masks[f"model.layers.{b}.{name}.weight"]
            agree += int((got == mask).sum())
            total += mask.numel()
    assert agree / total >= 0.999


def test_gblm_alpha_zero_gives_wanda_masks(tiny, ids):
    wanda = run_local(copy.deepcopy(tiny), ids, _pcfg(method="wanda"), progress=False)
    gblm0 = run_local(copy.deepcopy(tiny), ids, _pcfg(method="gblm", **{"gblm.alpha": 0}), progress=False)
    assert wanda.masks.keys() == gblm0.masks.keys()
    for k in wanda.masks:
        assert torch.equal(wanda.masks[k], gblm0.masks[k]), k


def test_gblm_first_block_uses_gradient_scores(tiny, ids):
    """Block 0 sees the dense inputs, so its GBLM mask is computable directly."""
    model = copy.deepcopy(tiny)
    cfg = _pcfg(method="gblm", **{"gblm.alpha": 100, "gblm.norm": "l2"})
    grads = gradient_pass(copy.deepcopy(tiny), ids, ("sq",), scale=cfg.gblm.grad_scale, progress=False)
    out = run_local(model, ids, cfg, progress=False)
    acc = _naive_block_stats(copy.deepcopy(tiny), ids, 0)
    for name, lin in block_linears(decoder_blocks(tiny)[0]).items():
        full = f"model.layers.0.{name}.weight"
        score = gblm_score(lin.weight, torch.sqrt(acc[name] / ids.shape[0]), grads[full]["sq"], 100.0, "l2",
                           grad_scale=cfg.gblm.grad_scale)
        agree = (row_mask(score, 0.5) == out.masks[full]).float().mean()
        assert agree >= 0.999, (name, agree)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gblm"])
def test_every_method_reaches_nm_exactly(tiny, ids, method, pattern):
    model = copy.deepcopy(tiny)
    out = run_local(model, ids, _pcfg(method=method, pattern=pattern), progress=False)
    n, m = map(int, pattern.split(":"))
    params = dict(model.named_parameters())
    for name, mask in out.masks.items():
        groups = mask.reshape(mask.shape[0], -1, m)
        assert bool((groups.sum(-1) == n).all()), name
        assert bool((params[name][mask] == 0).all()), name


def test_magnitude_unstructured_is_one_threshold_per_matrix(tiny, ids):
    model = copy.deepcopy(tiny)
    out = run_local(model, ids, _pcfg(method="magnitude", sparsity=0.3), progress=False)
    params = dict(tiny.named_parameters())
    for name, mask in out.masks.items():
        w = params[name].detach().abs()
        assert mask.sum() == int(w.numel() * 0.3)
        assert w[mask].max() <= w[~mask].min()


def test_sample_windows_follow_the_protocol():
    tokens = torch.arange(10_000)
    got = sample_windows(tokens, 100, 7, seed=3, field="calibration.source")
    idx = random.Random(3).sample(range(100), 7)
    assert torch.equal(got, torch.stack([tokens[i * 100 : (i + 1) * 100] for i in idx]))


def test_self_generated_calibration_is_deterministic(tiny):
    tok = byte_tokenizer()
    a = generate_windows(tiny, tok, 2, 12, seed=5)
    b = generate_windows(tiny, tok, 2, 12, seed=5)
    c = generate_windows(tiny, tok, 2, 12, seed=6)
    assert a.shape == (2, 12) and torch.equal(a, b) and not torch.equal(a, c)
    # each sequence depends only on its own seed: the 2nd of seed 5 is the 1st of seed 6
    assert torch.equal(a[1], c[0])


def test_gradient_rows_are_evenly_spaced_and_scaled_to_all_windows():
    from orchestrator.pruning.methods import gradient_rows, gradient_sum_scale

    assert gradient_rows(32, 8) == (0, 4, 8, 12, 16, 20, 24, 28)
    assert gradient_rows(7, 3) == (0, 2, 4)
    assert gradient_rows(7, None) is None and gradient_rows(7, 7) is None and gradient_rows(7, 9) is None
    assert gradient_sum_scale("l1", 32, gradient_rows(32, 8)) == 4.0
    assert gradient_sum_scale("l2", 32, gradient_rows(32, 8)) == 2.0  # sums of squares: sqrt(4) on each gradient
    assert gradient_sum_scale("l1", 32, None) == 1.0


@pytest.mark.parametrize("norm,kind", [("l1", "abs"), ("l2", "sq")])
def test_grad_samples_use_the_selected_windows_scaled_to_n(tiny, ids, norm, kind):
    """``gblm.grad_samples``: the statistics of the selected windows, times N/K (l1) or per gradient
    sqrt(N/K) (l2), so the sums estimate those over all N; with K = N the plain pass."""
    from orchestrator.engine.local import method_gradients

    n = ids.shape[0]
    k = max(1, n // 2)
    cfg = _pcfg(method="gblm", **{"gblm.norm": norm, "gblm.grad_samples": k, "gblm.grad_dtype": "float32"})
    got = method_gradients(copy.deepcopy(tiny), ids, cfg, progress=False)
    rows = [i * n // k for i in range(k)]
    plain = gradient_pass(copy.deepcopy(tiny), ids[rows], (kind,), scale=cfg.gblm.grad_scale, progress=False)
    for name, stats in plain.items():
        torch.testing.assert_close(got[name][kind], stats[kind] * (n / k), rtol=1e-5, atol=1e-6)
    full = _pcfg(method="gblm", **{"gblm.norm": norm, "gblm.grad_samples": n, "gblm.grad_dtype": "float32"})
    every = method_gradients(copy.deepcopy(tiny), ids, full, progress=False)
    ref = gradient_pass(copy.deepcopy(tiny), ids, (kind,), scale=cfg.gblm.grad_scale, progress=False)
    for name in ref:
        torch.testing.assert_close(every[name][kind], ref[name][kind])
