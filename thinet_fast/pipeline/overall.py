"""One progress bar across a whole sequential prune: each unit advances it by its
estimated cost, so the ETA is right although deep units cost more; and one line per
finished unit (kept channels, error, seconds)."""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..counting import profile
from ..units import Unit

__all__ = ["unit_costs", "Overall"]


def unit_costs(model: nn.Module, units: list[Unit], example: torch.Tensor | None) -> list[float]:
    """A unit's pass costs about its consumer's forward (the FLOPs) plus the statistics,
    whose Gram grows with the consumer's input width C·t against its K outputs: so
    ``flops · (1 + C·t / K)``. Equal weights when there is no example to count on."""
    if example is None or not units:
        return [1.0] * len(units)
    try:
        flops = {lc.name: lc.flops for lc in profile(model, example[:1]).layers}
    except Exception:  # counting is advisory: never fail a prune over a progress bar
        return [1.0] * len(units)
    costs = [float(flops.get(u.consumer, 0)) * (1 + u.channels * u.taps / max(u.consumer_out, 1)) for u in units]
    floor = max(costs) * 1e-3 if max(costs) > 0 else 1.0
    return [max(c, floor) for c in costs]


class Overall:
    def __init__(self, model: nn.Module, units: list[Unit], example, enabled: bool):
        self.enabled = enabled and bool(units)
        costs = unit_costs(model, units, example) if self.enabled else [1.0] * len(units)
        total = sum(costs) or 1.0
        self.share = {u.producer: 100.0 * c / total for u, c in zip(units, costs)}
        self.n = len(units)
        self.bar = tqdm(total=100.0, desc=f"prune ({self.n} units)", position=0, leave=False, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
                        disable=not self.enabled)
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def skip(self, unit: Unit) -> None:
        """A unit restored from a checkpoint: counted as done, without a time."""
        self.bar.update(self.share[unit.producer])

    def done(self, index: int, unit: Unit, kept: int, error: float) -> None:
        self.bar.update(self.share[unit.producer])
        if self.enabled:
            self.bar.write(f"[{index + 1}/{self.n}] {unit.producer} -> {unit.consumer}: kept {kept}/{unit.channels}, "
                           f"error {error:.3g}, {time.perf_counter() - self.t0:.1f}s")

    def close(self) -> None:
        self.bar.close()
