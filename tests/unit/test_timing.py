"""Phase-time predictions (orchestrator/timing.py) against their formulas, and the measured CPU profile."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.planner import LLAMA2_13B, LLAMA3_70B, ModelShape, plan
from orchestrator.timing import PROFILES, Accelerator, fold_bytes_per_token, predict_phases, zero3_modules

#: round numbers, so each term is easy to check by hand
FLAT = Accelerator("test", fp32_flops=1e12, bf16_flops=4e12, mem_bw=1e11, link_bw=1e10, score_rate=1e9)
KW = dict(method="gblm", num_samples=64, seq_len=1024, grad_batch=1, dtype_bytes=2)


def test_gradient_pass_is_compute_plus_memory_plus_communication() -> None:
    s = ModelShape.from_config(LLAMA2_13B)
    lin = s.layers * s.block_linear_params()
    tokens = 8 * 1024  # 64 sequences over 8 workers
    got = predict_phases(LLAMA2_13B, FLAT, workers=8, **KW)["gradient_pass"]
    attention = s.layers * 2 * 1024 * s.heads * s.head_dim
    compute = tokens * (6 * lin + 3 * attention + 2 * 2 * s.vocab * s.hidden) / 1e12
    memory = (tokens * s.activations_per_token() * s.layers * 4 * 4 + 8 * lin * 4 * (6 + 2)) / 1e11
    comm = plan(LLAMA2_13B, workers=8, **KW).comm_per_seq_bytes * 8 / 1e10
    assert got == pytest.approx(compute + memory + comm, rel=1e-9)


def test_checkpointing_bf16_and_workers_move_the_gradient_pass_as_they_should() -> None:
    base = predict_phases(LLAMA2_13B, FLAT, workers=8, **KW)["gradient_pass"]
    ckpt = predict_phases(LLAMA2_13B, FLAT, workers=8, checkpoint=True, **KW)["gradient_pass"]
    bf16 = predict_phases(LLAMA2_13B, FLAT, workers=8, grad_dtype="bfloat16", **KW)["gradient_pass"]
    assert base < ckpt < 1.5 * base  # one more forward (2P of 6P) and a third gather
    assert bf16 < base
    one = predict_phases(LLAMA2_13B, FLAT, workers=1, **KW)
    eight = predict_phases(LLAMA2_13B, FLAT, workers=8, **KW)
    assert eight["block_pass"] < one["block_pass"] / 4  # sequences split 8 ways, a block gather added


def test_block_pass_adds_the_solves_for_sparsegpt_and_eval_splits_over_actors() -> None:
    kw = dict(KW, method="wanda")
    wanda = predict_phases(LLAMA2_13B, FLAT, workers=4, **kw)
    sgpt = predict_phases(LLAMA2_13B, FLAT, workers=4, **(kw | {"method": "sparsegpt"}))
    assert "gradient_pass" not in wanda and sgpt["block_pass"] > wanda["block_pass"]
    one = predict_phases(LLAMA2_13B, FLAT, workers=4, eval_windows=40, **kw)["eval"]
    four = predict_phases(LLAMA2_13B, FLAT, workers=4, eval_windows=40, eval_workers=4, **kw)["eval"]
    assert four == pytest.approx(one / 4, rel=1e-9)
    # evaluation computes in the model's dtype, whatever the pruning passes' autocast: bf16 here (2-byte)
    s = ModelShape.from_config(LLAMA2_13B)
    per_token = 2 * s.layers * s.block_linear_params() + 2 * s.vocab * s.hidden + s.layers * 2 * 512 * s.hidden
    want = 40 * 512 * (per_token / 4e12 + s.activations_per_token() * s.layers * 2 / 1e11)
    for fwd in ("float32", "bfloat16"):
        got = predict_phases(LLAMA2_13B, FLAT, workers=4, eval_windows=40, forward_dtype=fwd, **kw)["eval"]
        assert got == pytest.approx(want, rel=1e-9)
    fp32 = predict_phases(LLAMA2_13B, FLAT, workers=4, eval_windows=40, eval_dtype="float32", **kw)["eval"]
    assert fp32 == pytest.approx(40 * 512 * (per_token / 1e12 + s.activations_per_token() * s.layers * 4 / 1e11))


def test_the_admm_search_adds_its_iterations_and_eigensolves_to_the_block_pass() -> None:
    from orchestrator.timing import ADMM_ITERS

    kw = dict(KW, method="sparsegpt", reconstruct="layer")
    base = predict_phases(LLAMA2_13B, FLAT, workers=4, **kw)["block_pass"]
    admm = predict_phases(LLAMA2_13B, FLAT, workers=4, search="admm", **kw)["block_pass"]
    s = ModelShape.from_config(LLAMA2_13B)
    flops = s.layers * sum(ADMM_ITERS * 2 * o * i * i + 9 * i**3 for o, i in s.block_linears().values())
    assert admm - base == pytest.approx(flops / FLAT.alone().flops("float32"), rel=1e-9)


def test_70b_on_one_h100_node_takes_minutes_not_hours() -> None:
    t = predict_phases(LLAMA3_70B, PROFILES["h100"], workers=8, checkpoint=True, grad_dtype="bfloat16",
                       forward_dtype="bfloat16", **KW | {"num_samples": 128, "seq_len": 2048})
    assert 30 < t["gradient_pass"] < 1800 and 5 < t["block_pass"] < 900


def test_overheads_add_exactly_their_terms() -> None:
    """ZeRO-3's per-module and start costs on the gradient pass, the per-block round trip and copies on the
    block pass; a block running at half the modelled speed doubles the block part of a phase."""
    s = ModelShape.from_config(LLAMA2_13B)
    lin = s.layers * s.block_linear_params()
    kw = dict(KW, grad_batch=2)  # 64 sequences over 8 workers: 4 micro-batches each
    base = predict_phases(LLAMA2_13B, FLAT, workers=8, **kw)
    over = dataclasses.replace(FLAT, module_s=1e-3, startup_s=2.0, block_call_s=0.5, block_copy_bw=1e9)
    got = predict_phases(LLAMA2_13B, over, workers=8, **kw)
    assert zero3_modules(s) == 40 * 9 + 3
    assert got["gradient_pass"] - base["gradient_pass"] == pytest.approx(2.0 + 4 * 363 * 2 * 1e-3, rel=1e-9)
    assert got["block_pass"] - base["block_pass"] == pytest.approx(40 * 0.5 + lin * 4 / 1e9, rel=1e-9)
    ckpt = predict_phases(LLAMA2_13B, over, workers=8, checkpoint=True, **kw)
    ckpt_base = predict_phases(LLAMA2_13B, FLAT, workers=8, checkpoint=True, **kw)
    assert ckpt["gradient_pass"] - ckpt_base["gradient_pass"] == pytest.approx(2.0 + 4 * 363 * 3 * 1e-3, rel=1e-9)
    one = dict(KW, method="wanda")
    slow = dataclasses.replace(FLAT, fp32_efficiency=(0.5, 0.25))
    fast_wanda = predict_phases(LLAMA2_13B, FLAT, workers=1, **one)["block_pass"]
    slow_wanda = predict_phases(LLAMA2_13B, slow, workers=1, **one)["block_pass"]
    fold = 64 * 1024 * s.layers * fold_bytes_per_token(s) / FLAT.mem_bw  # the first forward's statistics
    blocks = fast_wanda - lin / FLAT.score_rate - lin * 3 / FLAT.link_bw - fold  # the forwards alone
    assert slow_wanda - fast_wanda == pytest.approx(blocks, rel=1e-9)
    assert predict_phases(LLAMA2_13B, slow, workers=1, forward_dtype="bfloat16", **one)["block_pass"] < fast_wanda


def test_fresh_memory_adds_every_gather_and_the_zeroed_statistics() -> None:
    """A CPU writes each gathered parameter and the new statistic partitions into fresh pages, and in the block
    pass each block's copy and the scorer's statistics (the scoring's transients are in its measured rate)."""
    s = ModelShape.from_config(LLAMA2_13B)
    kw = dict(KW, grad_batch=2)  # 4 micro-batches per worker
    base = predict_phases(LLAMA2_13B, FLAT, workers=8, **kw)
    fresh = predict_phases(LLAMA2_13B, dataclasses.replace(FLAT, alloc_bw=1e9), workers=8, **kw)
    stats = sum(plan(LLAMA2_13B, workers=8, **kw).grad_stat_bytes.values())
    want = (4 * 2 * s.total_params() * 2 + stats) / 1e9
    assert fresh["gradient_pass"] - base["gradient_pass"] == pytest.approx(want, rel=1e-9)
    lin = s.layers * s.block_linear_params()  # the block pass: each block's plain copy, the scorer's statistic
    block = (s.layers * s.block_params() * 4 + lin * 4) / 1e9
    assert fresh["block_pass"] - base["block_pass"] == pytest.approx(block, rel=1e-9)


def test_statistic_fold_moves_its_bytes_at_the_fold_bandwidth() -> None:
    """The block pass's first forward folds every linear's input (read, square written and read, in fp32): its
    bytes at :attr:`Accelerator.fold_bw` where measured, else at the memory bandwidth; the gradient pass has
    no such fold."""
    s = ModelShape.from_config(LLAMA2_13B)
    assert fold_bytes_per_token(s) == 12 * (6 * s.hidden + s.intermediate)  # q, k, v, gate, up, o: hidden wide
    kw = dict(KW, method="wanda")
    base = predict_phases(LLAMA2_13B, FLAT, workers=8, **kw)
    slow = predict_phases(LLAMA2_13B, dataclasses.replace(FLAT, fold_bw=FLAT.mem_bw / 4), workers=8, **kw)
    tokens = 8 * 1024  # 64 sequences over 8 workers
    extra = 3 * tokens * s.layers * fold_bytes_per_token(s) / FLAT.mem_bw
    assert slow["block_pass"] - base["block_pass"] == pytest.approx(extra, rel=1e-9)
    gblm = predict_phases(LLAMA2_13B, dataclasses.replace(FLAT, fold_bw=1.0), workers=8, **KW)["gradient_pass"]
    assert gblm == predict_phases(LLAMA2_13B, FLAT, workers=8, **KW)["gradient_pass"]


def test_sharing_divides_rates_but_the_scorer_runs_alone() -> None:
    """Four workers on a machine for two: every per-worker rate halves, the link too (a CPU's collectives are
    its cores' copies); the scorer, which runs while the others wait, keeps the unshared rate."""
    acc = dataclasses.replace(FLAT, module_s=1e-3, alloc_bw=1e9)
    two = acc.shared(2)
    assert (two.fp32_flops, two.link_bw, two.alloc_bw, two.module_s) == (5e11, 5e9, 5e8, 2e-3)
    assert two.alone() == acc and acc.alone() is acc and acc.shared(1) is acc
    kw = dict(KW, method="wanda")
    s = ModelShape.from_config(LLAMA2_13B)
    lin = s.layers * s.block_linear_params()
    slow = dataclasses.replace(two, score_rate=two.score_rate / 100)  # a scorer this slow dominates the pass
    assert (predict_phases(LLAMA2_13B, slow, workers=4, **kw)["block_pass"]
            - predict_phases(LLAMA2_13B, two, workers=4, **kw)["block_pass"]
            == pytest.approx(lin / (FLAT.score_rate / 100) - lin / FLAT.score_rate, rel=1e-9))


def test_measured_cpu_profile_is_sane(tmp_path) -> None:
    from orchestrator.engine.profile import measure_cpu, save_rate

    acc = measure_cpu(1, tokens=64, hidden=128, inter=256)
    assert acc.fp32_flops > 1e8 and acc.bf16_flops > 1e7 and acc.mem_bw > 1e8 and acc.score_rate > 1e5
    assert 1e8 < acc.alloc_bw
    assert "measured" in acc.name and acc.fp32_efficiency == (1.0, 1.0)  # no shape: nothing timed
    shaped = measure_cpu(1, tokens=32, hidden=64, inter=128, shape=ModelShape(64, 128, 2, 4, 2, 256, 16, False))
    assert all(0 < e < 10 for e in shaped.fp32_efficiency + shaped.bf16_efficiency)
    assert shaped.fold_bw > 0 and acc.fold_bw == 0  # the fold is timed on the real block only
    assert acc.save_bw == 0 and save_rate(tmp_path) > 1e6 and list(tmp_path.iterdir()) == []  # probe removed
    assert shaped.module_s > 0 and shaped.startup_s > 0


def test_grad_samples_shrink_only_the_gradient_pass() -> None:
    """A quarter of the windows: a quarter of the per-sequence work of the gradient pass (its start stays)."""
    over = dataclasses.replace(FLAT, startup_s=3.0)
    kw = dict(KW, num_samples=64, grad_batch=1)
    full = predict_phases(LLAMA2_13B, over, workers=8, **kw)
    part = predict_phases(LLAMA2_13B, over, workers=8, grad_samples=16, **kw)
    assert part["gradient_pass"] - 3.0 == pytest.approx((full["gradient_pass"] - 3.0) / 4, rel=1e-9)
    assert part["block_pass"] == full["block_pass"]
    assert predict_phases(LLAMA2_13B, over, workers=8, grad_samples=640, **kw) == full  # K >= N: all of them


def test_gradient_checkpoints_write_every_ranks_partitions_at_the_save_rate() -> None:
    """A Ray run's gradient saves: one every ``checkpoint_every`` sequences and at the end, each only
    ``checkpoint_interval_s`` after the last; each writes all ranks' statistic partitions at the save rate."""
    from orchestrator.timing import gradient_saves

    assert gradient_saves(16, 8, 0.0, 50.0) == 2 and gradient_saves(16, 8, 300.0, 50.0) == 0  # recomputed
    assert gradient_saves(64, 8, 300.0, 1000.0) == 3  # at 300, 600 and 900 s; the end comes too soon after
    assert gradient_saves(64, 8, 10.0, 1000.0) == 8 and gradient_saves(3, 8, 0.0, 1.0) == 1
    acc = dataclasses.replace(FLAT, save_bw=1e9)
    stats = sum(plan(LLAMA2_13B, workers=8, **KW).grad_stat_bytes.values())
    got = predict_phases(LLAMA2_13B, acc, workers=8, grad_saves=3, **KW)
    assert got["checkpoints"] == pytest.approx(3 * 8 * stats / 1e9, rel=1e-9)
    assert "checkpoints" not in predict_phases(LLAMA2_13B, FLAT, workers=8, grad_saves=3, **KW)  # no rate known
    assert got["gradient_pass"] == predict_phases(LLAMA2_13B, acc, workers=8, **KW)["gradient_pass"]


def test_a_ray_run_config_predicts_its_checkpoints() -> None:
    from orchestrator.inputs.config import RunConfig
    from orchestrator.timing import predict_run

    cfg = RunConfig()
    cfg.backend.kind, cfg.backend.workers, cfg.calibration.num_samples = "ray", 8, 128
    cfg.backend.checkpoint_interval_s = 0.0  # 16 sequences per rank, a save every 8
    got = predict_run(cfg, LLAMA2_13B, PROFILES["h100"], checkpoint=False)
    cfg.backend.checkpoint_interval_s = 300.0  # a pass of seconds on H100s: recomputed, never saved
    assert "checkpoints" not in predict_run(cfg, LLAMA2_13B, PROFILES["h100"], checkpoint=False)
    cfg.backend.checkpoint_interval_s = 0.0
    stats = sum(plan(LLAMA2_13B, workers=8, method="gblm", num_samples=128, seq_len=cfg.calibration.seq_len,
                     grad_batch=cfg.backend.grad_batch_size).grad_stat_bytes.values())
    assert got["checkpoints"] == pytest.approx(2 * 8 * stats / PROFILES["h100"].save_bw, rel=1e-6)
    cfg.backend.kind = "local"
    assert "checkpoints" not in predict_run(cfg, LLAMA2_13B, PROFILES["h100"], checkpoint=False)
