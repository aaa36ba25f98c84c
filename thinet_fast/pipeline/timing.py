"""Where a prune's time went: seconds per phase, summed over units."""
from __future__ import annotations

import contextlib
import time

import torch

PHASES = ("forward", "statistics", "selection", "reconstruction", "rewrite", "bn_recalibration", "report")


class Timings:
    """Seconds per phase. CUDA work is synchronised at phase edges so it lands in the
    phase that queued it."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = {p: 0.0 for p in PHASES}
        self._sync = device is not None and device.type == "cuda"
        self._t0 = time.perf_counter()

    def sync(self) -> None:
        if self._sync:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timed(self, name: str, fn):
        """``fn`` wrapped so that its calls count towards ``name``."""
        def run(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return run

    def as_dict(self) -> dict[str, float]:
        out = dict(self.seconds)
        out["total"] = time.perf_counter() - self._t0
        out["other"] = max(0.0, out["total"] - sum(self.seconds.values()))
        return out
