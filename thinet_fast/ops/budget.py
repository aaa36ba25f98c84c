"""Budget allocation from greedy error curves (DESIGN.md §6).

Greedy removal to the end gives every unit's error curve E_u(n) for all n at once, so
choosing per-unit keep counts under a FLOPs (or parameter) budget needs no evaluation
loop: minimise Σ_u E_u(n_u)/E_u(all) subject to the saving, by repeatedly removing the
channel with the smallest marginal relative error per unit of cost saved.
"""
from __future__ import annotations

import heapq

import torch

__all__ = ["allocate_budget"]


def allocate_budget(curves: list[torch.Tensor], costs: list[float], target: float, *,
                    min_count: list[int] | int = 1, min_keep: list[int] | int | None = None) -> list[int]:
    """Channels to remove per unit so that the saved cost reaches ``target``.

    Args:
        curves: per unit, the relative error after removing 1, 2, ... channels
            (``errors / 1ᵀG1`` from :func:`greedy_remove`), length C_u - 1 or more.
        costs: per unit, the cost one removed channel saves (FLOPs or parameters).
        target: the total cost to save (same unit as ``costs``).
        min_count: channels every unit keeps at least (an int or one per unit; a
            count, where ``PruneConfig.min_keep`` is a fraction). ``min_keep=`` is the
            old name of this argument, still accepted.

    Returns:
        the number of channels to remove per unit. Raises ValueError when the target
        cannot be met within ``min_count``.
    """
    n = len(curves)
    if len(costs) != n:
        raise ValueError(f"got {len(curves)} curves but {len(costs)} costs")
    if min_keep is not None:
        min_count = min_keep
    mins = [min_count] * n if isinstance(min_count, int) else list(min_count)
    if len(mins) != n:
        raise ValueError(f"min_count has {len(mins)} entries for {n} units")
    if any(c <= 0 for c in costs):
        raise ValueError("every per-channel cost must be > 0")
    caps = []
    for j, (curve, m) in enumerate(zip(curves, mins)):
        channels = curve.numel() + 1
        if not 1 <= m <= channels:
            raise ValueError(f"min_count[{j}]={m} is outside [1, {channels}]")
        caps.append(channels - m)
    possible = sum(c * k for c, k in zip(costs, caps))
    if target > possible * (1 + 1e-12):
        raise ValueError(f"the budget asks to save {target:.4g} but at most {possible:.4g} can be saved "
                         "with these min_count settings")
    removed = [0] * n
    curves = [c.double().cpu().tolist() for c in curves]

    def marginal(j: int) -> float:
        k = removed[j]
        prev = curves[j][k - 1] if k else 0.0
        return (curves[j][k] - prev) / costs[j]

    # ties go to the lowest unit index, as in the greedy selection itself
    heap = [(marginal(j), j) for j in range(n) if caps[j] > 0]
    heapq.heapify(heap)
    saved = 0.0
    while saved < target and heap:
        _, j = heapq.heappop(heap)
        removed[j] += 1
        saved += costs[j]
        if removed[j] < caps[j]:
            heapq.heappush(heap, (marginal(j), j))
    return removed
