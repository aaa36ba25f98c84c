"""How much host memory is free now: the one reading every memory budget starts from
(the replay cache, the decoded-image cache)."""
from __future__ import annotations

import os

__all__ = ["available_host_memory"]


def available_host_memory(fallback: int = 4 << 30) -> int:
    """Bytes of host memory available now (MemAvailable, else free physical pages, else
    ``fallback``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return fallback
