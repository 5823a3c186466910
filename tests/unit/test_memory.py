"""A worker's memory accounting (actors/memory.py): the allocated-bytes peak sees what lives between marks."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from actors.memory import PhaseMemory, heap_allocated

MIB = 2**20
pytestmark = pytest.mark.skipif(heap_allocated() == 0, reason="needs glibc's mallinfo2 (glibc >= 2.33)")


def test_the_phase_peak_counts_a_transient_no_mark_sees() -> None:
    """A 64 MiB activation lives only inside a forward: the marks before and after miss it, the peak does not."""
    mem = PhaseMemory("cpu", trace=True)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 16384, bias=False), nn.ReLU())  # (1024, 16384) fp32: 64 MiB out
        x = torch.randn(1024, 1024)
        with torch.no_grad():
            model(x)  # the first matmul's one-off scratch and caches stay allocated: not this test's subject
        gc.collect()
        mem.mark("start")
        mem.begin("work")
        with torch.no_grad():
            total = model(x).sum()  # the activation (and ReLU's copy) are freed when this returns
        mem.end("work")
        mem.mark("end")
        rep = mem.report()
        start = rep["allocated_bytes_by_phase"]["start"]
        # Linear's output and ReLU's (2 x 64 MiB; one alone is 64): the margin is for the small buffers the
        # interpreter frees meanwhile (a full-suite run measured 128 MiB - 30 KiB)
        assert rep["peak_allocated_bytes_by_phase"]["work"] - start >= 112 * MIB
        assert rep["allocated_bytes_by_phase"]["end"] - start < 16 * MIB
        assert torch.isfinite(total) and rep["allocation_sampling_seconds"] > 0 and rep["allocated_peak_traced"]
    finally:
        mem.close()


def _warm_model_in_a_phase(mem: PhaseMemory) -> nn.Module:
    """A model whose forward makes a 64 MiB activation, run once (its one-off scratch settles), then the
    ``start`` mark and an open ``work`` phase."""
    model = nn.Sequential(nn.Linear(1024, 16384, bias=False), nn.ReLU())
    with torch.no_grad():
        model(torch.randn(1024, 1024))
    gc.collect()  # earlier tests' garbage is freed before the mark, not during the phase
    mem.mark("start")
    mem.begin("work")
    return model


def test_closed_accounting_samples_nothing() -> None:
    """After :meth:`close` no hook samples: a transient inside a forward leaves the open phase's peak alone."""
    mem = PhaseMemory("cpu", trace=True)
    mem.close()
    model = _warm_model_in_a_phase(mem)
    with torch.no_grad():
        model(torch.randn(1024, 1024)).sum()
    rep = mem.report()
    assert rep["peak_allocated_bytes_by_phase"]["work"] - rep["allocated_bytes_by_phase"]["start"] < 32 * MIB


def test_without_tracing_only_the_marks_sample(monkeypatch) -> None:
    """The default on a CPU (no RAYPRUNE_TRACE_MEMORY): no hooks, no sampling time; the marks still count."""
    monkeypatch.delenv("RAYPRUNE_TRACE_MEMORY", raising=False)
    mem = PhaseMemory("cpu")
    assert not mem.trace and mem._hooks == []
    model = _warm_model_in_a_phase(mem)
    with torch.no_grad():
        kept = model(torch.randn(1024, 1024))  # 64 MiB still live at the end: the phase's close sees it
        model(torch.randn(1024, 1024)).sum()
    mem.end("work")
    rep = mem.report()
    # the kept 64 MiB (less whatever small buffers the interpreter let go of meanwhile: the full suite once
    # measured 63.9 MiB without the collection above)
    assert rep["peak_allocated_bytes_by_phase"]["work"] - rep["allocated_bytes_by_phase"]["start"] >= 48 * MIB
    assert rep["allocation_sampling_seconds"] == 0.0 and kept.shape == (1024, 16384)
    assert rep["allocated_peak_traced"] is False  # report.md shows no peak for it
    monkeypatch.setenv("RAYPRUNE_TRACE_MEMORY", "1")
    traced = PhaseMemory("cpu")
    assert traced.trace and len(traced._hooks) == 2
    traced.close()
