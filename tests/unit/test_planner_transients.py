"""The planner's transient terms measured against the engine: ZeRO-3's gathered parameters, the statistics in
flight to their reduce-scatter, activations under autocast (orchestrator/planner.py, orchestrator/shapes.py)."""

from __future__ import annotations

from orchestrator.planner import (
    FOLD_PENDING,
    LLAMA2_13B,
    LLAMA3_70B,
    ZERO3_MAX_LIVE_PARAMETERS,
    ZERO3_PREFETCH_BUCKET,
    ModelShape,
    gathered_bytes,
    plan,
    zero3_limits,
)

#: a shape whose two blocks are far below ZeRO-3's live limit
SMALL = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 100, "tie_word_embeddings": False}


def test_gathered_parameters_follow_zero3s_live_limits() -> None:
    """One rank gathers nothing; more gather the running module plus the live and prefetch limits, at most two
    blocks. Llama-3-70B's largest module is its head (128256 x 8192), a tiny model's cap is two blocks."""
    s70 = ModelShape.from_config(LLAMA3_70B)
    assert gathered_bytes(s70, 1, 2) == 0
    down = 8192 * 28672  # the largest linear: live limit two of them, prefetch one
    assert gathered_bytes(s70, 8, 2) == min(2 * s70.block_params(), 128256 * 8192 + 3 * down) * 2
    tiny = ModelShape.from_config(SMALL)
    assert gathered_bytes(tiny, 2, 4) == 2 * tiny.block_params() * 4
    # one micro-batch per rank: ZeRO-3 is still recording the module order and prefetches nothing
    assert gathered_bytes(s70, 8, 2, steps=1) == 128256 * 8192 * 2
    assert gathered_bytes(tiny, 2, 4, steps=1) == max(48 * 32, 100 * 32) * 4
    one = plan(SMALL, workers=2, method="gblm", num_samples=2, seq_len=16, grad_batch=1)  # 1 sequence per rank
    two = plan(SMALL, workers=2, method="gblm", num_samples=4, seq_len=16, grad_batch=1)  # 2 micro-batches
    assert two.grad_pass_bytes - one.grad_pass_bytes == gathered_bytes(tiny, 2, 2) - gathered_bytes(tiny, 2, 2, 1)
    from actors.loading import ds_config

    zero = ds_config(2)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == ZERO3_MAX_LIVE_PARAMETERS
    assert zero["stage3_prefetch_bucket_size"] == ZERO3_PREFETCH_BUCKET


def test_statistics_in_flight_are_the_largest_consecutive_linears() -> None:
    """Backward order runs down, up, gate, o, v, k, q, then the block below's down: the window of two is down
    and up; of eight, the whole block and one more down. Gloo's copy doubles them."""
    s = ModelShape.from_config(LLAMA2_13B)
    h, i = 5120, 13824
    assert s.consecutive_linears(2) == 2 * h * i
    assert s.consecutive_linears(8) == s.block_linear_params() + h * i
    sizes = [o * n for o, n in s.block_linears().values()][::-1] * 4  # the same, by brute force
    assert s.consecutive_linears(5) == max(sum(sizes[j : j + 5]) for j in range(7))
    kw = dict(workers=8, method="gblm", num_samples=64, seq_len=1024, grad_batch=1)
    nccl, gloo, one = plan(LLAMA2_13B, **kw), plan(LLAMA2_13B, host_collectives=True, **kw), plan(
        LLAMA2_13B, **kw | {"workers": 1})
    in_flight = s.consecutive_linears(FOLD_PENDING) * 4
    assert nccl.fold_bytes - one.fold_bytes == in_flight and gloo.fold_bytes - one.fold_bytes == 2 * in_flight
    assert one.fold_bytes == h * i * (2 + 4 + 4)  # bf16 product, its fp32 copy, the statistic
    fp32 = plan(LLAMA2_13B, **kw | {"workers": 1, "dtype_bytes": 4})
    assert fp32.fold_bytes == h * i * (4 + 4)  # an fp32 product needs no copy
    autocast = plan(LLAMA2_13B, **kw | {"workers": 1, "dtype_bytes": 4, "compute_bytes": 2})
    assert autocast.fold_bytes == h * i * (2 + 4 + 4)  # a bf16 product under autocast, then its fp32 copy


def test_bf16_autocast_keeps_most_activations_narrow() -> None:
    """An fp32 model under bf16 autocast: the norms' inputs and outputs and the log-sum-exp stay fp32, the rest
    of each block's saved activations are bf16; a compute dtype as wide as the model's changes nothing."""
    s = ModelShape.from_config(LLAMA2_13B)
    tokens = 1024
    wide = 4 * s.hidden + s.heads
    want = s.layers * tokens * (wide * 4 + (s.activations_per_token() - wide) * 2) + tokens * s.hidden * 4
    assert s.backward_bytes(tokens, 4, False, compute_bytes=2) == want
    assert s.backward_bytes(tokens, 4, False, compute_bytes=4) == s.backward_bytes(tokens, 4, False)
    assert s.backward_bytes(tokens, 2, False, compute_bytes=4) == s.backward_bytes(tokens, 2, False)
    kw = dict(workers=2, method="gblm", num_samples=8, seq_len=tokens, grad_batch=1, dtype_bytes=4)
    fp32, bf16 = plan(LLAMA2_13B, **kw), plan(LLAMA2_13B, compute_bytes=2, **kw)
    product = s.largest_linear() * 2  # and the per-sample product is formed in bf16 before its fp32 copy
    assert fp32.grad_pass_bytes - bf16.grad_pass_bytes == s.backward_bytes(tokens, 4, False) - want - product


def test_run_plan_kwargs_resolve_auto_with_the_hardware() -> None:
    from orchestrator.inputs.config import RunConfig
    from orchestrator.planner import run_plan_kwargs

    cfg = RunConfig()
    assert cfg.pruning.gblm.grad_dtype == "auto"
    assert run_plan_kwargs(cfg)["compute_bytes"] is None  # unknown hardware: planned in the model dtype
    assert run_plan_kwargs(cfg.with_compute_dtypes(True))["compute_bytes"] == 2
    assert run_plan_kwargs(cfg.with_compute_dtypes(False))["compute_bytes"] == 4


def test_zero3_limits_hold_the_largest_linears_unless_the_budget_is_small() -> None:
    """Llama-3-70B's linears (up to 235M elements) dwarf the fixed 10M/5M limits, which would turn prefetch off;
    the derived limits keep two live and prefetch one, and fall back where they would take over a tenth of the
    device. The engines' DeepSpeed config carries them."""
    from actors.loading import ds_config

    s70 = ModelShape.from_config(LLAMA3_70B)
    down = 8192 * 28672
    assert zero3_limits(s70, 2, 80 * 2**30) == (2 * down, down)
    assert zero3_limits(s70, 2, 8 * 2**30) == (down, ZERO3_PREFETCH_BUCKET)
    assert zero3_limits(ModelShape.from_config(SMALL), 2) == (ZERO3_MAX_LIVE_PARAMETERS, ZERO3_PREFETCH_BUCKET)
    assert zero3_limits(None) == (ZERO3_MAX_LIVE_PARAMETERS, ZERO3_PREFETCH_BUCKET)
    zero = ds_config(8, limits=zero3_limits(s70, 2, 80 * 2**30))["zero_optimization"]
    assert (zero["stage3_max_live_parameters"], zero["stage3_prefetch_bucket_size"]) == (2 * down, down)
