"""Peak memory of a stretch of evaluation work.

On CUDA the peak is the allocator's ``max_memory_allocated``, reset per measurement. On the CPU it
is the process's peak resident set size, a high-water mark that cannot be reset: measured for
increasing lengths in one process, it stays flat exactly when memory does not grow with length.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

PROC_STATUS = Path("/proc/self/status")


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM``, which belongs to the address space and so starts afresh at exec.
    ``ru_maxrss`` does not: a child started by a large parent (a test runner, a benchmark holding a
    model) would report at least the parent's size at fork.
    """
    if PROC_STATUS.exists():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` and ``peak.kind``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda allocated" if device.type == "cuda" else "process RSS"
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = process_peak_rss_bytes()
