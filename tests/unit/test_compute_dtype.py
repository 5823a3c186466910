"""``auto`` compute dtypes: bf16 where the hardware computes it natively, fp32 elsewhere, one key away."""

from __future__ import annotations

import pytest
import torch

from orchestrator.engine import device as device_mod
from orchestrator.engine.device import Placement, native_bf16
from orchestrator.inputs.config import resolve_compute_dtype
from orchestrator.inputs.loader import load_config
from orchestrator.surfaces.runkeys import key_document
from orchestrator.timing import Accelerator


def test_defaults_are_auto_and_resolve_by_hardware():
    cfg = load_config(None, [])
    assert (cfg.backend.forward_dtype, cfg.pruning.gblm.grad_dtype) == ("auto", "auto")
    on, off = cfg.with_compute_dtypes(True), cfg.with_compute_dtypes(False)
    assert on.compute_dtypes() == {"forward_dtype": "bfloat16", "grad_dtype": "bfloat16"}
    assert off.compute_dtypes() == {"forward_dtype": "float32", "grad_dtype": "float32"}
    assert cfg.backend.forward_dtype == "auto"  # a copy: the config itself is left as written


def test_an_explicit_dtype_is_kept_on_any_hardware():
    cfg = load_config(None, ["backend.forward_dtype=float32", "pruning.gblm.grad_dtype=float16"])
    assert cfg.with_compute_dtypes(True).compute_dtypes() == {"forward_dtype": "float32", "grad_dtype": "float16"}
    assert resolve_compute_dtype("bfloat16", False) == "bfloat16"


def test_a_bad_dtype_names_the_field():
    with pytest.raises(Exception, match=r"backend\.forward_dtype.*'fp8'"):
        load_config(None, ["backend.forward_dtype=fp8"])


@pytest.mark.parametrize(("avx512_bf16", "amx", "expect"), [(True, False, True), (False, True, True),
                                                          (False, False, False)])
def test_cpu_bf16_is_native_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expect):
    monkeypatch.delenv("RAYPRUNE_NATIVE_BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert native_bf16("cpu") is expect
    assert Placement.of("cpu", "auto").autocast_dtype == (torch.bfloat16 if expect else None)
    assert Placement.of("cpu", "float32").autocast_dtype is None


@pytest.mark.parametrize(("capability", "expect"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpu_bf16_is_native_from_compute_capability_8(monkeypatch, capability, expect):
    monkeypatch.delenv("RAYPRUNE_NATIVE_BF16")
    monkeypatch.setattr(device_mod.torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(torch.device("cuda", 0)) is expect


@pytest.mark.parametrize(("forced", "expect"), [("0", False), ("1", True)])
def test_the_environment_overrides_the_hardware(monkeypatch, forced, expect):
    monkeypatch.setenv("RAYPRUNE_NATIVE_BF16", forced)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not expect, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not expect, raising=False)
    assert native_bf16("cpu") is expect


def test_the_time_prediction_resolves_auto_for_its_accelerator():
    kw = dict(fp32_flops=1e12, bf16_flops=4e12, mem_bw=1e11, link_bw=1e10, score_rate=1e9)
    assert Accelerator("bf16", **kw).flops("auto") == 4e12
    assert Accelerator("fp32 only", **kw, native_bf16=False).flops("auto") == 1e12
    assert Accelerator("fp32 only", **kw, native_bf16=False).flops("bfloat16") == 4e12


def test_the_run_key_hashes_the_dtype_as_written():
    """``auto`` is keyed as ``auto`` (the key is computed before any worker exists); an explicit
    dtype is a different key, and the report records what ``auto`` became."""
    docs = [key_document(load_config(None, ["model.source=tiny", *o]))["config"]
            for o in ([], ["backend.forward_dtype=float32"], ["backend.forward_dtype=bfloat16"])]
    assert docs[0]["backend"]["forward_dtype"] == "auto"
    assert len({str(d) for d in docs}) == 3
