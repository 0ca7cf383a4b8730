"""Peak memory of one call, for the benchmarks that compare two arms (each arm in a fresh process).

On CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it. On CPU:
the process's peak RSS during the call (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``) minus its RSS before it. Run the process with ``MALLOC_MMAP_THRESHOLD_=65536``
(:data:`ENV`) so freed tensors leave the RSS and the RSS follows live memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

#: Environment for a measuring subprocess (glibc's mmap threshold pinned at 64 KiB).
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Run ``fn()`` once; the peak memory it added, in MiB."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fn()
    return (rss_kib("VmHWM") - before) / 1024
