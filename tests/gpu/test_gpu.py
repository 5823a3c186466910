"""GPU tests (marker ``gpu``): the suite's Ray-free rows under pytest, skipped only where CUDA is missing.

Nothing here is skipped for a missing package: on a GPU machine without the bundle they fail, as they should.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_statistics_stay_fp32_under_cuda_autocast_and_tf32():
    from tests.gpu.rows import Context, stats_fp32_row

    row = stats_fp32_row(Context())
    assert row["ok"], row


def test_sparsegpt_synchronises_a_handful_of_times_not_per_column():
    from tests.gpu.rows import Context, sparsegpt_syncs_row

    row = sparsegpt_syncs_row(Context())
    assert row["ok"], row
