"""Measuring a run: wall time, peak memory (CUDA allocator or sampled RSS), a memory cap, out-of-memory as a result."""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from collections.abc import Callable

import torch

MEMORY_SAMPLE_S = 0.01  # RSS sampling period inside a timed run (a training step lasts seconds)
# On a CPU an allocation beyond the memory available when a run starts raises instead of waking the kernel's OOM
# killer (which would take the whole benchmark, and maybe a neighbour's job, with it); 0.9 leaves the rest for others.
MEMORY_HEADROOM = 0.9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall time of a block (after waiting for the GPU, where there is one)."""

    def __enter__(self) -> Stopwatch:
        _sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.started


def release_freed_memory() -> None:
    """Hand memory that earlier runs freed back to the OS (glibc keeps it), so a run's RSS rise is its own."""
    import ctypes
    import ctypes.util

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak on a GPU, else this process's RSS sampled every 10 ms."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()
        release_freed_memory()
        self.start = self.peak = process.memory_info().rss

        def sample():
            while not self._stop.wait(MEMORY_SAMPLE_S):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    def figures(self) -> dict:
        return {"peak_memory_gb": self.peak / 2**30, "memory_rise_gb": (self.peak - self.start) / 2**30}


def memory_kind() -> str:
    if torch.cuda.is_available():
        return "peak CUDA memory allocated by torch (VRAM); rise = above what was allocated before the run"
    return ("peak resident set size of this process (every side's model is loaded), sampled every 10 ms; rise = above the "
            "RSS at the run's start, after freed memory was returned to the OS: what the run itself needs")


@contextlib.contextmanager
def memory_limit():
    """On Linux CPUs, cap this process's address space at what is free now (see MEMORY_HEADROOM)."""
    if torch.cuda.is_available() or sys.platform != "linux":
        yield
        return
    import resource

    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + int(psutil.virtual_memory().available * MEMORY_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(exc)


def guarded(side: Callable[[], dict]) -> Callable[[], dict]:
    """A side that records running out of memory instead of raising, and is not retried after it."""
    failure: dict = {}

    def run() -> dict:
        if failure:
            return dict(failure)
        try:
            with memory_limit():
                return side()
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            failure["error"] = "out of memory: " + str(exc).splitlines()[0][:200]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return dict(failure)

    return run
