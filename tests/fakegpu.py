"""A second device for a CPU-only torch: ``fakegpu``, torch's PrivateUse1 backend served from Python.

How it works: torch reserves a dispatch key (PrivateUse1) for out-of-tree devices and lets
Python register a backend on it (``_setup_privateuseone_for_python_backend``). A tensor of this
device is a wrapper subclass whose storage is an ordinary CPU tensor; a boxed fallback for the
whole PrivateUse1 key unwraps every argument, runs the CPU kernel and wraps the results again.
Autograd, hooks and ``nn.Module.to`` work unchanged because the wrapping sits below autograd.

What it checks: like a real accelerator, a kernel given a ``fakegpu`` tensor together with a CPU
tensor (other than a 0-dim scalar, which CUDA kernels accept too) raises ``RuntimeError``. Code
that forgets to create a tensor on its device, or to move a tensor it received, fails here
exactly where it would fail on a GPU, on any machine, without CUDA.

Install it in a fresh process (it renames PrivateUse1 for the life of the process): call
:func:`install` once, then use ``torch.device("fakegpu")`` and run inside :class:`FakeGpuMode`.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

NAME = "fakegpu"
# ops that legitimately take tensors of two devices (the copies behind .to() and .copy_())
_CROSS_DEVICE = {"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize"}
_installed = False


class FakeGpuTensor(torch.Tensor):
    """A ``fakegpu`` tensor: a wrapper around a CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> FakeGpuTensor:
        return torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), dtype=elem.dtype,
                                                   device=torch.device(NAME, 0), requires_grad=False)

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _run(func, args, kwargs):
    name = func.__name__.split(".")[0]

    def unwrap(x):
        if isinstance(x, FakeGpuTensor):
            return x.elem
        if isinstance(x, torch.Tensor) and x.dim() > 0 and name not in _CROSS_DEVICE:
            raise RuntimeError(f"{func}: a {x.device} tensor of shape {tuple(x.shape)} mixed with {NAME} tensors")
        if isinstance(x, torch.device) and x.type == NAME:
            return torch.device("cpu")
        return x

    target = kwargs.get("device")
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if name == "_to_copy" and target is not None and torch.device(target).type != NAME:
        return out  # .to("cpu"): leaves the device
    return tree_map(lambda x: FakeGpuTensor(x) if isinstance(x, torch.Tensor) else x, out)


class FakeGpuMode(TorchFunctionMode):
    """``torch.tensor(data, device=fakegpu)`` is built by a C++ path the Python fallback cannot serve:
    build it on the CPU and move it, as the data would travel to a real device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and dev is not None and torch.device(dev).type == NAME:
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            return func(*args, **kwargs).to(dev)
        return func(*args, **kwargs)


def install() -> torch.device:
    """Register the ``fakegpu`` device in this process (idempotent); returns it."""
    global _installed
    if not _installed:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(NAME)
        lib = torch.library.Library("_", "IMPL")  # noqa: TOR901 - a process-wide fallback on purpose
        lib.fallback(lambda op, *a, **k: _run(op, a, k), dispatch_key="PrivateUse1")
        globals()["_lib"] = lib  # keep the registration alive
        # autocast on this device (entered, disabled, by a reentrant checkpoint's recompute) asks its module which
        # dtypes AMP supports: none, so autocast is never enabled here
        torch.fakegpu.get_amp_supported_dtype = lambda: []
        _installed = True
    return torch.device(NAME, 0)
