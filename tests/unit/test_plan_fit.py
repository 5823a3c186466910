"""The plan against a real device: fixed GPU terms, fragmentation, SparseGPT's copies, links, the verdict."""

from __future__ import annotations

import pytest

from orchestrator.plan_fit import CUDA_CONTEXT_BYTES, FRAGMENTATION, NCCL_BYTES, device_need, link_bw, verdict
from orchestrator.planner import GIB, LLAMA3_70B, SPARSEGPT_H_COPIES, plan

KW = dict(method="gblm", num_samples=128, seq_len=2048, grad_batch=1, checkpoint=True)


def test_gpu_need_adds_context_nccl_and_fragmentation_to_the_allocator_peak() -> None:
    p = plan(LLAMA3_70B, workers=8, dtype_bytes=2, **KW)
    gpu, cpu = device_need(p, gpu=True), device_need(p, gpu=False)
    assert cpu.total_bytes == max(p.peak_bytes, p.load_bytes)
    assert gpu.total_bytes == cpu.total_bytes + round(cpu.total_bytes * FRAGMENTATION) + CUDA_CONTEXT_BYTES + NCCL_BYTES
    one = plan(LLAMA3_70B, workers=1, dtype_bytes=2, **KW)
    assert device_need(one, gpu=True).fixed_bytes == CUDA_CONTEXT_BYTES  # no communicator on one rank


def test_llama3_70b_on_8_h100s_is_refused_in_fp32_and_fits_in_bf16() -> None:
    fp32 = plan(LLAMA3_70B, workers=8, dtype_bytes=4, **KW)
    refusal = verdict(fp32, 80 * GIB, gpu=True)
    assert refusal is not None and "model.dtype=bfloat16" in refusal and "80.00 GiB" in refusal
    assert verdict(plan(LLAMA3_70B, workers=8, dtype_bytes=2, **KW), 80 * GIB, gpu=True) is None


def test_sparsegpt_counts_its_factorisation_copies_of_the_widest_hessian() -> None:
    kw = {**KW, "method": "wanda"}
    wanda = plan(LLAMA3_70B, workers=8, reconstruct="layer", **kw)  # keeps xtx like SparseGPT, no factorisation
    sgpt = plan(LLAMA3_70B, workers=8, **{**kw, "method": "sparsegpt"})
    assert sgpt.largest_block_bytes - wanda.largest_block_bytes == SPARSEGPT_H_COPIES * 28672**2 * 4  # 3 x 3.3 GB


def test_links_limit_collectives_across_nodes_only() -> None:
    nvlink = 315e9
    assert link_bw(nvlink, "infiniband", 8, 8)[0] == nvlink  # one node: NVLink
    ib, where = link_bw(nvlink, "infiniband", 16, 8)
    assert ib == pytest.approx(50e9 * 0.7) and "2 nodes" in where
    assert link_bw(nvlink, "tcp", 16, 8)[0] == pytest.approx(12.5e9 * 0.7 / 8)  # one NIC shared by 8 ranks
    assert link_bw(nvlink, "tcp", 4, 1)[0] == pytest.approx(12.5e9 * 0.7)  # one GPU per pod: every hop is TCP
    with pytest.raises(ValueError, match="unknown link"):
        link_bw(nvlink, "carrier-pigeon", 2, 1)


def test_plan_command_prints_the_device_terms_and_refuses_fp32_70b(capsys) -> None:
    from pathlib import Path

    from orchestrator.surfaces.cli import main

    cfg = str(Path(__file__).resolve().parents[2] / "configs" / "llama2-13b.yaml")
    assert main(["plan", "--shape", "llama3-70b", cfg, "backend.workers=8", "model.dtype=float32"]) == 0
    out = capsys.readouterr().out
    assert "CUDA context 0.50 GiB" in out and "fragmentation 10%" in out
    assert "verdict: refused: the plan needs" in out
    assert "collectives: 8 rank(s) on one node" in out
    assert main(["plan", "--shape", "llama3-70b", "--link", "tcp", "--gpus-per-node", "1", cfg,
                 "backend.workers=8", "model.dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits 80.00 GiB per worker" in out and "8 ranks on 8 nodes over TCP" in out
