"""Memory and communication planner (orchestrator/planner.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.planner import (
    FOLD_PENDING,
    GIB,
    LLAMA2_13B,
    LLAMA2_70B,
    LLAMA3_70B,
    LOSS_CHUNK_ELEMENTS,
    SCORE_BYTES_PER_WEIGHT,
    ModelShape,
    Plan,
    format_plan,
    gathered_bytes,
    grad_kinds_for,
    min_workers,
    needs_checkpointing,
    plan,
)
from orchestrator.pruning.methods import gradient_kinds, needs_xtx

TINY = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 100,
    "tie_word_embeddings": False,
}


def _hf_count(**kw) -> tuple[int, LlamaConfig]:
    torch.manual_seed(0)
    cfg = LlamaConfig(**kw)
    model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters()), cfg


@pytest.mark.parametrize(
    "kv,tied,extra",
    [
        (4, False, {}),
        (2, False, {}),  # GQA
        (4, True, {}),
        (1, True, {}),  # MQA, tied
        (2, False, {"head_dim": 16}),  # head_dim != hidden / heads
        (2, False, {"attention_bias": True, "mlp_bias": True}),
    ],
)
def test_param_count_equals_hf_llama(kv: int, tied: bool, extra: dict) -> None:
    kw = dict(TINY, num_key_value_heads=kv, tie_word_embeddings=tied, num_hidden_layers=2, **extra)
    expected, cfg = _hf_count(**kw)
    assert ModelShape.from_config(cfg).total_params() == expected  # from the config object
    assert ModelShape.from_config(kw).total_params() == expected  # from a plain dict
    assert plan(cfg, workers=1, method="wanda", num_samples=1, seq_len=2).total_params == expected


def test_gradient_stats_cover_exactly_the_decoder_linears() -> None:
    kw = dict(TINY, num_key_value_heads=2, num_hidden_layers=2)
    _, cfg = _hf_count(**kw)
    model = LlamaForCausalLM(cfg)
    linear = sum(
        m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
    )
    p = plan(cfg, workers=1, method="gblm", norm="l1", num_samples=4, seq_len=8)
    assert p.grad_stat_bytes == {"abs": linear * 4}
    block_params = sum(q.numel() for q in model.model.layers[0].parameters())
    assert ModelShape.from_config(cfg).block_params() == block_params


def test_published_llama2_totals() -> None:
    n13 = ModelShape.from_config(LLAMA2_13B).total_params()
    n70 = ModelShape.from_config(LLAMA2_70B).total_params()
    assert n13 == 13_015_864_320
    assert n70 == 68_976_648_192
    assert n13 == pytest.approx(13.0e9, rel=0.01)
    assert n70 == pytest.approx(69.0e9, rel=0.01)


def test_grad_kinds_mirror_pruning_methods() -> None:
    for method in ("magnitude", "wanda", "sparsegpt", "gblm"):
        for norm in ("l1", "l2"):
            assert grad_kinds_for(method, norm) == gradient_kinds(method, norm)
    assert grad_kinds_for("gblm", "l1") == ("abs",)
    assert grad_kinds_for("gblm", "l2") == ("sq",)


def test_sizes_match_formulas_llama2_13b() -> None:
    n, seq, w = 128, 2048, 8
    p = plan(LLAMA2_13B, workers=w, method="gblm", norm="l2", num_samples=n, seq_len=seq, dtype_bytes=2)
    s = ModelShape.from_config(LLAMA2_13B)
    lin = 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824)
    assert p.param_bytes == math.ceil(s.total_params() * 2 / w)
    assert p.grad_stat_bytes == {"sq": math.ceil(lin * 4 / w)}
    assert p.calib_bytes == math.ceil(n / w) * seq * 5120 * 4 * 2
    block = 4 * 5120 * 5120 + 3 * 5120 * 13824 + 2 * 5120
    assert p.largest_block_bytes == block * 4 + (lin // 40) * 4 + 5120 * 13824 * SCORE_BYTES_PER_WEIGHT
    assert p.peak_bytes == p.param_bytes + p.grad_stat_bytes["sq"] + max(
        p.grad_pass_bytes, p.calib_bytes + p.largest_block_bytes
    )
    ring = (w - 1) / w
    # per micro-batch of 4 (the default grad_batch): gather twice, reduce-scatter grad_sq once
    assert p.comm_per_seq_bytes == pytest.approx(ring * (2 * s.total_params() * 2 + lin * 4) / 4, abs=1)


def test_grad_batch_divides_communication_and_scales_activations() -> None:
    common = dict(workers=8, method="gblm", num_samples=64, seq_len=1024)
    one, four = plan(LLAMA2_13B, grad_batch=1, **common), plan(LLAMA2_13B, grad_batch=4, **common)
    assert one.comm_per_seq_bytes == pytest.approx(4 * four.comm_per_seq_bytes, abs=4)
    s = ModelShape.from_config(LLAMA2_13B)
    per_seq = s.layers * 1024 * s.activations_per_token() * 2 + 1024 * s.hidden * 4
    per_seq_fold = s.largest_linear() * (2 + 4)  # one more sample's per-sample product (bf16, then fp32)
    assert four.grad_pass_bytes - one.grad_pass_bytes == 3 * (per_seq + per_seq_fold)
    assert four.fold_bytes - one.fold_bytes == 3 * per_seq_fold
    # no full logits: the loss chunk is a constant, far below seq_len * vocab * 4 per sequence at batch 4
    gathered = gathered_bytes(s, 8, 2)
    assert one.grad_pass_bytes - (gathered + per_seq + one.fold_bytes) == LOSS_CHUNK_ELEMENTS * 4


def test_loss_chunk_constant_matches_the_loss() -> None:
    from orchestrator.pruning.lmloss import CHUNK_ELEMENTS

    assert LOSS_CHUNK_ELEMENTS == CHUNK_ELEMENTS


def test_sparsegpt_adds_xtx_and_no_gradients() -> None:
    common = dict(workers=4, num_samples=64, seq_len=512)
    sg = plan(LLAMA2_70B, method="sparsegpt", **common)
    wa = plan(LLAMA2_70B, method="wanda", **common)
    assert needs_xtx("sparsegpt") and not needs_xtx("wanda")
    h, i = 8192, 28672
    xtx = (6 * h * h + i * i) * 8  # fp64 sums: q, k, v, gate, up read hidden; o reads heads*head_dim = hidden; down i
    factor = 3 * i * i * 4  # factorising down_proj's Hessian: H, its damped copy, one Cholesky factor
    assert sg.largest_block_bytes - wa.largest_block_bytes == xtx + factor
    for p in (sg, wa):
        assert p.grad_kinds == () and p.grad_stat_bytes == {}
        assert p.grad_pass_bytes == 0 and p.comm_per_seq_bytes == 0


def test_block_reconstruction_adds_the_tuning_state() -> None:
    """``reconstruct: block`` keeps ``sum x x^T`` like ``layer``, plus Adam's state and the gradient of every
    block linear (fp32) and one sequence's saved activations through one block."""
    common = dict(workers=4, num_samples=64, seq_len=512, method="wanda")
    layer, block = plan(LLAMA2_70B, reconstruct="layer", **common), plan(LLAMA2_70B, reconstruct="block", **common)
    h, i, kv = 8192, 28672, 8 * 128
    linears = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    per_token = ModelShape.from_config(LLAMA2_70B).activations_per_token()
    assert block.largest_block_bytes - layer.largest_block_bytes == 3 * linears * 4 + 512 * per_token * 4
    assert layer.largest_block_bytes > plan(LLAMA2_70B, **common).largest_block_bytes  # layer adds xtx


def test_the_admm_search_adds_its_eigendecomposition_and_iterates() -> None:
    """``search: admm`` holds, for the widest linear (down_proj, in = 28672), fp64 ``H``, its eigenvectors and the
    eigensolver's workspace plus the fp32 inverse, and nine fp32 ``(out, in)`` iterates of the largest linear."""
    from orchestrator.planner import ADMM_IN_IN_BYTES, ADMM_OUT_IN_COPIES

    common = dict(workers=4, num_samples=64, seq_len=512, method="sparsegpt", reconstruct="layer")
    base, admm = plan(LLAMA2_70B, **common), plan(LLAMA2_70B, search="admm", **common)
    assert ADMM_IN_IN_BYTES == 3 * 8 + 4 and ADMM_OUT_IN_COPIES == 9
    assert admm.largest_block_bytes - base.largest_block_bytes == 28 * 28672**2 + 9 * 8192 * 28672 * 4


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gblm"])
def test_sharded_bytes_scale_as_one_over_w(method: str) -> None:
    base = plan(LLAMA2_13B, workers=1, method=method, num_samples=64, seq_len=1024)
    for w in (2, 4, 8, 16):
        p = plan(LLAMA2_13B, workers=w, method=method, num_samples=64, seq_len=1024)
        assert p.param_bytes == pytest.approx(base.param_bytes / w, abs=1)
        for k, v in p.grad_stat_bytes.items():
            assert v == pytest.approx(base.grad_stat_bytes[k] / w, abs=1)
        assert p.calib_bytes == base.calib_bytes // w  # 64 divides evenly
        assert p.largest_block_bytes == base.largest_block_bytes  # a gathered block is not sharded
        # the transient is not sharded either; only W > 1 gathers and has statistics waiting for their
        # reduce-scatter
        steps = 64 // w // 4  # micro-batches of 4 per rank (16 workers: one, so ZeRO-3 prefetches nothing)
        gathered = gathered_bytes(ModelShape.from_config(LLAMA2_13B), w, 2, steps) if p.grad_kinds else 0
        assert p.grad_pass_bytes - p.fold_bytes - gathered == base.grad_pass_bytes - base.fold_bytes
        assert p.fold_bytes == plan(LLAMA2_13B, workers=2, method=method, num_samples=64, seq_len=1024).fold_bytes
        assert p.peak_bytes < base.peak_bytes


def test_calibration_rounds_up_per_worker() -> None:
    p = plan(TINY, workers=3, method="wanda", num_samples=10, seq_len=16)
    assert p.calib_bytes == 4 * 16 * 32 * 4 * 2


def test_single_worker_needs_no_communication_and_more_workers_more() -> None:
    one = plan(LLAMA2_13B, workers=1, method="gblm", num_samples=8, seq_len=128)
    assert one.comm_per_seq_bytes == 0 and one.comm_block_pass_bytes == 0
    vols = [plan(LLAMA2_13B, workers=w, method="gblm", num_samples=8, seq_len=128).comm_per_seq_bytes
            for w in (2, 4, 8)]
    assert vols == sorted(vols) and vols[0] > 0
    # bounded by the no-ring-factor volume
    s = ModelShape.from_config(LLAMA2_13B)
    assert vols[-1] < (2 * s.total_params() * 2 + 40 * s.block_linear_params() * 4) / 4


def test_l1_and_l2_cost_the_same_one_buffer() -> None:
    a = plan(LLAMA2_13B, workers=4, method="gblm", norm="l1", num_samples=8, seq_len=128)
    b = plan(LLAMA2_13B, workers=4, method="gblm", norm="l2", num_samples=8, seq_len=128)
    assert list(a.grad_stat_bytes) == ["abs"] and list(b.grad_stat_bytes) == ["sq"]
    assert a.peak_bytes == b.peak_bytes


def test_min_workers_monotone_in_gpu_size() -> None:
    kw = dict(method="gblm", num_samples=128, seq_len=2048, grad_batch=1, checkpoint=True)
    sizes = [80, 96, 141, 192, 288]
    ws = [min_workers(LLAMA2_70B, g * GIB, **kw) for g in sizes]
    assert ws == sorted(ws, reverse=True), ws
    assert ws[0] > ws[-1]
    for g, w in zip(sizes, ws, strict=True):
        fits = plan(LLAMA2_70B, workers=w, **kw).peak_bytes * 1.2 <= g * GIB
        assert fits
        if w > 1:
            assert plan(LLAMA2_70B, workers=w - 1, **kw).peak_bytes * 1.2 > g * GIB


def test_min_workers_safety_factor_and_dtype() -> None:
    kw = dict(method="gblm", num_samples=128, seq_len=2048, grad_batch=1)
    relaxed = min_workers(LLAMA2_13B, 80 * GIB, safety_factor=1.0, **kw)
    strict = min_workers(LLAMA2_13B, 80 * GIB, safety_factor=2.0, **kw)
    assert strict > relaxed
    fp32 = min_workers(LLAMA2_13B, 80 * GIB, dtype_bytes=4, **kw)
    assert fp32 > min_workers(LLAMA2_13B, 80 * GIB, dtype_bytes=2, **kw)


@pytest.mark.parametrize("shape", [LLAMA2_70B, LLAMA3_70B])
def test_70b_gblm_fits_one_8_gpu_node_only_with_activation_checkpointing(shape) -> None:
    """bf16, GBLM, 128 x 2048 tokens: without checkpointing the activations of one 2048-token sequence
    through 80 blocks (which do not shrink with W) leave room for little else in 80 GiB (dozens of workers;
    four sequences per backward never fit); with it, 8 workers fit with >= 10% free."""
    kw = dict(method="gblm", num_samples=128, seq_len=2048, grad_batch=1, dtype_bytes=2)
    with pytest.raises(ValueError, match="no worker count"):
        min_workers(shape, 80 * GIB, **(kw | {"grad_batch": 4}))
    assert min_workers(shape, 80 * GIB, **kw) > 32
    p = plan(shape, workers=8, checkpoint=True, **kw)
    assert p.activation_checkpointing and p.peak_bytes <= 0.9 * 80 * GIB, p.peak_bytes / GIB
    assert min_workers(shape, 80 * GIB, safety_factor=1.1, checkpoint=True, **kw) <= 8
    assert needs_checkpointing(shape, 80 * GIB, workers=8, **kw)
    assert not needs_checkpointing(LLAMA2_13B, 80 * GIB, workers=8, method="wanda", num_samples=128, seq_len=2048)


def test_checkpointing_keeps_block_inputs_and_one_block() -> None:
    kw = dict(workers=8, method="gblm", num_samples=64, seq_len=1024, grad_batch=2)
    plain, ckpt = plan(LLAMA2_13B, **kw), plan(LLAMA2_13B, checkpoint=True, **kw)
    s, tokens = ModelShape.from_config(LLAMA2_13B), 2 * 1024
    one_block = tokens * s.activations_per_token() * 2
    assert plain.grad_pass_bytes - ckpt.grad_pass_bytes == (s.layers - 1) * one_block - s.layers * tokens * s.hidden * 2
    assert ckpt.fold_bytes == plain.fold_bytes and ckpt.param_bytes == plain.param_bytes
    # the recomputed forward gathers every block a third time
    assert ckpt.comm_per_seq_bytes > plain.comm_per_seq_bytes
    assert not plan(LLAMA2_13B, **(kw | {"method": "wanda"}), checkpoint=True).activation_checkpointing


def test_offloaded_statistics_leave_the_accelerator() -> None:
    kw = dict(workers=8, method="gblm", num_samples=64, seq_len=1024, checkpoint=True)
    on, off = plan(LLAMA2_70B, offload_stats=True, **kw), plan(LLAMA2_70B, **kw)
    stats = sum(off.grad_stat_bytes.values())
    assert on.peak_bytes == off.peak_bytes - stats and on.host_bytes == stats and off.host_bytes == 0
    assert "(host)" in format_plan(on) and "(host)" not in format_plan(off)


def test_fold_pending_matches_the_sharded_statistics() -> None:
    import inspect

    from actors.zero3 import ShardedGradStats

    default = inspect.signature(ShardedGradStats).parameters["max_pending"].default
    assert default == FOLD_PENDING


def test_min_workers_impossible_and_bad_args() -> None:
    with pytest.raises(ValueError, match="no worker count"):
        min_workers(LLAMA2_70B, 1 * GIB, max_workers=64)  # one gathered block alone exceeds 1 GiB
    with pytest.raises(ValueError, match="no worker count"):
        # one 2048-token backward through 70B (no activation checkpointing) exceeds 40 GiB
        min_workers(LLAMA2_70B, 40 * GIB, method="gblm", num_samples=128, seq_len=2048)
    assert min_workers(LLAMA2_70B, 40 * GIB, method="wanda", num_samples=128, seq_len=2048) >= 2
    with pytest.raises(ValueError, match="safety_factor"):
        min_workers(LLAMA2_13B, 80 * GIB, safety_factor=0.5)
    assert min_workers(TINY, 80 * GIB) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(workers=0), "workers"),
        (dict(num_samples=-1), "num_samples"),
        (dict(method="obs"), "method"),
        (dict(norm="l3"), "norm"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(workers=2, method="gblm", num_samples=8, seq_len=16) | kwargs
    with pytest.raises(ValueError, match=match):
        plan(TINY, **args)


def test_bad_model_config() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_config({k: v for k, v in TINY.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="> 0"):
        ModelShape.from_config(dict(TINY, num_hidden_layers=0))


def test_to_dict_and_format() -> None:
    p = plan(LLAMA2_13B, workers=8, method="gblm", num_samples=128, seq_len=2048)
    d = p.to_dict()
    assert isinstance(p, Plan)
    assert d["workers"] == 8 and d["grad_kinds"] == ["abs"] and d["peak_bytes"] == p.peak_bytes
    assert d["grad_stat_bytes"] == {"abs": p.grad_stat_bytes["abs"]}
    text = format_plan(p)
    assert f"{p.param_bytes / GIB:.2f} GiB" in text
    assert f"{p.peak_bytes / GIB:.2f} GiB" in text
    assert "grad_abs" in text and "gblm" in text and "13.02 B" in text
    lines = text.splitlines()
    assert len(lines) >= 12 and all("  " in ln for ln in lines)


def _measured_backward_bytes(shape: dict, tokens: int, checkpoint: bool) -> int:
    """Bytes autograd holds for one sequence's backward, measured: the distinct storages saved in the forward
    (parameters excluded), plus with checkpointing the largest block recompute's saves during the backward."""
    from orchestrator.engine.blocks import decoder_blocks
    from orchestrator.engine.checkpointing import checkpointed_blocks
    from orchestrator.engine.local import causal_lm_loss
    from orchestrator.inputs.config import TinyModelConfig
    from orchestrator.inputs.models import build_tiny_llama

    model = build_tiny_llama(TinyModelConfig(**shape, max_positions=256, seed=0))
    for p in model.parameters():
        p.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buckets: list[dict[int, int]] = [{}]  # the forward's saves, then one per block recompute

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            buckets[-1][st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    with checkpointed_blocks(model, checkpoint), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, ids)
        hooks = [b.input_layernorm.register_forward_pre_hook(lambda *_: buckets.append({}))
                 for b in decoder_blocks(model)]
        loss.backward()
    for h in hooks:
        h.remove()
    recompute = max((sum(b.values()) for b in buckets[1:]), default=0)
    assert (recompute > 0) == checkpoint
    return sum(buckets[0].values()) + recompute


@pytest.mark.parametrize("shape", [dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128),
                                   dict(layers=3, hidden=96, heads=6, kv_heads=2, intermediate=256)])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_backward_bytes_within_15_percent_of_measured(shape: dict, checkpoint: bool) -> None:
    """The planner's activation term against what autograd really keeps, with and without checkpointing."""
    cfg = {"hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
           "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
           "num_key_value_heads": shape["kv_heads"], "vocab_size": 256}
    predicted = ModelShape.from_config(cfg).backward_bytes(128, 4, checkpoint)
    measured = _measured_backward_bytes(shape, 128, checkpoint)
    assert measured == pytest.approx(predicted, rel=0.15), (measured, predicted)


@pytest.mark.parametrize("second_order", [False, True])
def test_saap_plan_keeps_each_statistic_twice_and_no_block_pass(second_order: bool) -> None:
    """Structured pruning on the workers: ``grad_sum`` (and ``grad_sq`` for element2) for the current mini-batch
    and for all of them, sharded; the same gradient pass as GBLM's; no calibration states or gathered block."""
    kw = dict(workers=8, num_samples=128, seq_len=2048, grad_batch=1)
    saap = plan(LLAMA2_13B, method="saap", second_order=second_order, **kw)
    gblm = plan(LLAMA2_13B, method="gblm", **kw)
    kinds = ["sum", "sq"] if second_order else ["sum"]
    assert list(saap.grad_stat_bytes) == kinds + [f"{k}_total" for k in kinds]
    assert set(saap.grad_stat_bytes.values()) == {gblm.grad_stat_bytes["abs"]}
    assert saap.calib_bytes == saap.largest_block_bytes == saap.comm_block_pass_bytes == 0
    if not second_order:
        assert saap.grad_pass_bytes == gblm.grad_pass_bytes
    assert grad_kinds_for("saap", second_order=second_order) == tuple(kinds)


def test_evaluation_shards_only_where_one_device_cannot_hold_the_model() -> None:
    from orchestrator.plan_fit import eval_bytes, eval_workers_needed

    kw = dict(seq_len=512, dtype_bytes=2)
    s = ModelShape.from_config(LLAMA3_70B)
    whole = eval_bytes(LLAMA3_70B, **kw)
    assert whole == s.total_params() * 2 + 512 * s.activations_per_token() * 2 + 512 * s.vocab * (2 + 4)
    two = eval_bytes(LLAMA3_70B, workers=2, **kw)
    assert two == math.ceil(s.total_params() * 2 / 2) + 2 * s.block_params() * 2 + (whole - s.total_params() * 2)
    assert eval_workers_needed(LLAMA3_70B, 80 * GIB, **kw) == 2  # 140 GB of bf16 weights: two 80 GiB GPUs
    assert eval_workers_needed(LLAMA3_70B, 141 * GIB, **kw) == 2  # an H200 holds them, not with 10% free
    assert eval_workers_needed(LLAMA2_13B, 80 * GIB, **kw) == 1
    with pytest.raises(ValueError, match="no evaluation group"):
        eval_workers_needed(LLAMA3_70B, 1 * GIB, max_workers=8, **kw)


def test_recovery_adapter_and_parameter_terms_match_peft_and_the_shrunk_model() -> None:
    """The recovery plan's adapters are peft's trainable parameters; its parameters the model's (nothing removed)."""
    from peft import get_peft_model

    from orchestrator.inputs.config import StructuredRecoveryConfig
    from orchestrator.plan_fit import recovery_bytes
    from orchestrator.structured.recovery import lora_config

    count, cfg = _hf_count(**TINY)
    r = StructuredRecoveryConfig(rank=8)
    model = LlamaForCausalLM(cfg)
    peft_model = get_peft_model(model, lora_config(model, list(range(TINY["num_hidden_layers"])), r))
    adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    s = ModelShape.from_config(TINY)
    kw = dict(rank=8, seq_len=64, dtype_bytes=2)
    window = s.backward_bytes(64, 2, checkpoint=False) + 64 * s.vocab * (2 + 2 * 4)
    assert recovery_bytes(TINY, removed=0.0, **kw) == count * 2 + 4 * adapters * 4 + window
    # SAAP removing 20% of the decoder's linear weights removes them from the parameter term only
    cut = recovery_bytes(TINY, removed=0.0, **kw) - recovery_bytes(TINY, removed=0.2, **kw)
    assert cut == round(0.2 * s.layers * s.block_linear_params()) * 2
    two = recovery_bytes(TINY, removed=0.0, workers=2, **kw)
    assert two == math.ceil(count * 2 / 2) + 2 * s.block_params() * 2 + math.ceil(4 * adapters * 4 / 2) + window


def test_recovery_goes_zero3_only_where_one_device_cannot_hold_the_shrunk_model() -> None:
    from orchestrator.plan_fit import recovery_bytes, recovery_workers_needed

    kw = dict(removed=0.2, rank=8, seq_len=512, dtype_bytes=2)
    assert recovery_workers_needed(LLAMA2_13B, 80 * GIB, **kw) == 1
    n = recovery_workers_needed(LLAMA2_70B, 80 * GIB, **kw)
    assert n == 2 and recovery_bytes(LLAMA2_70B, workers=n, **kw) <= 0.9 * 80 * GIB
    assert recovery_bytes(LLAMA2_70B, workers=1, **kw) > 0.9 * 80 * GIB
    with pytest.raises(ValueError, match="no recovery group"):
        recovery_workers_needed(LLAMA2_70B, 1 * GIB, max_workers=4, **kw)
    with pytest.raises(ValueError, match="removed must be"):
        recovery_bytes(TINY, removed=1.0, rank=8, seq_len=8)


def test_plan_command_says_when_evaluation_and_recovery_must_be_sharded(capsys) -> None:
    from pathlib import Path

    from orchestrator.surfaces.cli import main

    saap = str(Path(__file__).resolve().parents[2] / "configs" / "saap.yaml")
    argv = ["plan", "--gpu-mem", "80", saap, "model.dtype=bfloat16", "structured.recovery.enabled=true"]
    assert main([*argv[:1], "--shape", "llama2-70b", *argv[1:]]) == 0
    out = capsys.readouterr().out
    assert "eval.shard=true eval.workers=2 (67.69 GiB each)" in out
    assert "recovery: 118.60 GiB per rank does not fit 80 GiB: structured.recovery.zero3=true " \
           "structured.recovery.workers=2 or more (69.53 GiB each)" in out
    assert main([*argv[:1], "--shape", "llama2-13b", *argv[1:]]) == 0
    out = capsys.readouterr().out
    assert "recovery: 24.21 GiB per rank: one 80 GiB GPU holds the shrunk model" in out
    assert "evaluation: 24.44 GiB per actor: one 80 GiB GPU holds the model" in out
