"""What a worker's memory does, phase by phase: the kernel's resident set and the allocator's live bytes.

Two views, because they answer different questions. The resident set (``/proc``) is what the host
pays: it includes the runtime, files read through memory and whatever the C allocator keeps after a
free. The allocated bytes are what the planner predicts: live tensors, the counter
``torch.cuda.max_memory_allocated`` keeps on a GPU at no cost. On a CPU, glibc's ``mallinfo2`` gives
the live bytes at any moment, but it walks the heap's free lists (0.5 us on a fresh heap, about 10 ms on
a fragmented one), so a CPU worker samples only at its phase marks unless ``RAYPRUNE_TRACE_MEMORY=1``:
then a forward hook on every module (installed for the whole process: a worker process runs nothing
else) and the gradient-statistic fold (:meth:`PhaseMemory.sample`) sample the peak too, and the time
the samples took is reported, so a benchmark can take it out of its phase times.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import torch


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux resets ``VmHWM`` when 5 is written to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size in bytes since the last :func:`reset_peak_rss` (``VmHWM``; 0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


#: ``1``: CPU workers sample their allocated bytes around every module (a measuring instrument: it costs time)
TRACE_MEMORY_ENV = "RAYPRUNE_TRACE_MEMORY"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def trim_heap() -> None:
    """Collect garbage and hand the heap's free memory back to the OS (glibc ``malloc_trim``; elsewhere a no-op),
    so transients of a finished phase do not stay in the resident set of the next."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def heap_allocated() -> int:
    """Bytes the C heap has handed out and not had back (arenas plus mmapped chunks); 0 without glibc 2.33."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class PhaseMemory:
    """Per-phase memory of one worker: the resident set and the allocated bytes at marks, and each phase's peaks.

    A phase runs from :meth:`begin` to :meth:`end` (or to :meth:`report` while still open). Marks are
    absolute byte counts at named moments (``start`` before the model, ``loaded``, ...).
    """

    def __init__(self, device: torch.device | str = "cpu", trace: bool | None = None) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.rss: dict[str, int] = {}
        self.allocated: dict[str, int] = {}
        self.peaks: dict[str, int] = {}  # peak RSS within each ended phase
        self.allocated_peaks: dict[str, int] = {}  # peak allocated bytes within each ended phase
        self.open: str | None = None
        self.lifetime_peak = 0  # peak RSS of the windows before the current one
        self._alloc_peak = 0
        self.sampling_seconds = 0.0  # time the samples between the marks took (RAYPRUNE_TRACE_MEMORY)
        self.trace = (not self.cuda and _MALLINFO2 is not None
                      and os.environ.get(TRACE_MEMORY_ENV, "").strip() == "1") if trace is None else trace
        self._hooks: list[Any] = []
        if self.trace:
            from torch.nn.modules import module

            self._hooks = [module.register_module_forward_pre_hook(lambda *_: self.sample()),
                           module.register_module_forward_hook(lambda *_: self.sample())]

    def allocated_now(self) -> int:
        """Live bytes on this worker's device now."""
        return int(torch.cuda.memory_allocated(self.device)) if self.cuda else heap_allocated()

    def sample(self) -> None:
        """Fold the live bytes now into the open phase's allocated peak (a no-op on a GPU, which counts itself,
        and on a CPU that does not trace)."""
        if self.trace:
            t0 = time.perf_counter()
            self._alloc_peak = max(self._alloc_peak, heap_allocated())
            self.sampling_seconds += time.perf_counter() - t0

    def _alloc_window(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        self._alloc_peak = max(self._alloc_peak, heap_allocated())  # the window's end counts too
        return self._alloc_peak

    def clear(self) -> None:
        """Forget the marks, peaks and sampling time of the last run (the lifetime peak stays)."""
        self.rss, self.allocated, self.peaks, self.allocated_peaks, self.open = {}, {}, {}, {}, None
        self.sampling_seconds = 0.0

    def mark(self, name: str) -> None:
        """Record the resident set and the allocated bytes now under ``name``."""
        self.rss[name] = current_rss()
        self.allocated[name] = self.allocated_now()
        if not self.cuda:
            self._alloc_peak = max(self._alloc_peak, self.allocated[name])

    def begin(self, phase: str) -> None:
        """Open ``phase``: its peaks count from now."""
        self.lifetime_peak = max(self.lifetime_peak, peak_rss(), *self.peaks.values())
        reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._alloc_peak = self.allocated_now()
        self.open = phase

    def end(self, phase: str) -> None:
        """Close ``phase``, keeping its peaks."""
        self.peaks[phase] = peak_rss()
        self.allocated_peaks[phase] = self._alloc_window()
        self.open = None

    def report(self) -> dict[str, Any]:
        """Marks and per-phase peaks (the open phase's up to now), absolute bytes."""
        peaks, alloc = dict(self.peaks), dict(self.allocated_peaks)
        if self.open is not None:
            peaks[self.open], alloc[self.open] = peak_rss(), self._alloc_window()
        start = self.allocated.get("start", 0)
        return {
            "peak_rss_bytes": max(self.lifetime_peak, *peaks.values(), peak_rss()),
            # what the planner's peak_bytes predicts: live bytes of this run's tensors at their most
            "peak_allocated_above_start_bytes": max(0, max(alloc.values(), default=start) - start),
            "rss_bytes_by_phase": {**self.rss, "end": current_rss()},
            "peak_rss_bytes_by_phase": peaks,
            "allocated_bytes_by_phase": {**self.allocated, "end": self.allocated_now()},
            "peak_allocated_bytes_by_phase": alloc,
            "allocation_sampling_seconds": self.sampling_seconds,
            # whether the allocated peaks are peaks (a GPU's counters, or a traced CPU) or only the marks' maximum
            "allocated_peak_traced": self.cuda or self.trace,
        }

    def close(self) -> None:
        """Remove the process-wide hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
