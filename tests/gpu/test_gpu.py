"""GPU tests (marker ``gpu``): skipped where CUDA is missing, run by ``tests/gpu/run.sh`` on a GPU machine."""

from __future__ import annotations

import argparse

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    started = not ray.is_initialized()
    if started:
        ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
def test_ray_worker_on_the_gpu_matches_the_cpu_local_engine(gpu_ray, method):
    from tests.gpu.check import one_row

    args = argparse.Namespace(samples=4, seq_len=64, windows=4, forward_dtype="float32")
    row = one_row("tiny", method, args)
    assert row["device"].startswith("cuda"), row
    assert row["masks_equal"] >= 0.999, row
    assert row["ppl_rel"] <= 0.01, row


def test_structured_importance_on_the_gpu():
    from tests.gpu.check import structured_row

    row = structured_row()
    assert row["group_order_equal"] and row["fused_max_rel"] < 1e-3, row
