"""Budget allocation from greedy error curves (DESIGN.md §6).

Greedy removal to the end gives every unit's error curve E_u(n) for all n at once, so
choosing per-unit keep counts under a FLOPs and/or parameter budget needs no
evaluation loop: minimise Σ_u E_u(n_u)/E_u(all) subject to the savings, by repeatedly
removing the channel with the smallest marginal relative error per unit of cost saved.

With several constraints (:func:`allocate_budgets`, e.g. FLOPs *and* parameters) each
removal serves the constraint that is furthest from being met, its shortfall measured
relative to its scale (the model's total count): the channel removed is the one with
the least error rise per unit of *that* constraint's cost. Removing a channel lowers
every count, so the loop ends with every constraint met whenever the floors allow it;
once one constraint is met the rule is the one-constraint greedy on the other, which is
optimal for convex curves up to the last step (a two-constraint knapsack in general has
no such greedy optimum; this rule is the documented, monotone compromise).
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch

__all__ = ["allocate_budget", "allocate_budgets"]


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
    if len(costs) != len(curves):
        raise ValueError(f"got {len(curves)} curves but {len(costs)} costs")
    return allocate_budgets(curves, [costs], [target], min_count=min_keep if min_keep is not None else min_count)


def allocate_budgets(curves: list[torch.Tensor], costs: Sequence[Sequence[float]], targets: Sequence[float], *,
                     min_count: list[int] | int = 1, scales: Sequence[float] | None = None,
                     names: Sequence[str] | None = None) -> list[int]:
    """Channels to remove per unit so that every saving ``targets[k]`` is reached.

    Args:
        curves: as for :func:`allocate_budget`.
        costs: per constraint k, per unit, the cost one removed channel saves.
        targets: per constraint, the total cost to save.
        min_count: channels every unit keeps at least (an int or one per unit).
        scales: per constraint, what a shortfall is measured against when choosing
            the most violated constraint (e.g. the model's total FLOPs / parameters);
            default: the most that constraint can save.
        names: per constraint, a name for error messages.

    Returns:
        the number of channels to remove per unit. Each step removes, for the
        constraint with the largest ``(target - saved) / scale``, the channel with the
        least marginal relative error per unit of that constraint's cost (ties: the
        lowest unit index, as in the greedy selection). Raises ValueError when a target
        cannot be met within ``min_count``.
    """
    n, n_con = len(curves), len(costs)
    names = list(names) if names is not None else [f"constraint {k}" for k in range(n_con)]
    if len(targets) != n_con or len(names) != n_con or (scales is not None and len(scales) != n_con):
        raise ValueError(f"got {n_con} cost lists but {len(targets)} targets")
    for k, c in enumerate(costs):
        if len(c) != n:
            raise ValueError(f"got {n} curves but {len(c)} costs ({names[k]})")
        if any(v <= 0 for v in c):
            raise ValueError(f"every per-channel cost must be > 0 ({names[k]})")
    mins = [min_count] * n if isinstance(min_count, int) else list(min_count)
    if len(mins) != n:
        raise ValueError(f"min_count has {len(mins)} entries for {n} units")
    caps = []
    for j, (curve, m) in enumerate(zip(curves, mins)):
        channels = curve.numel() + 1
        if not 1 <= m <= channels:
            raise ValueError(f"min_count[{j}]={m} is outside [1, {channels}]")
        caps.append(channels - m)
    possible = [sum(c * k for c, k in zip(cost, caps)) for cost in costs]
    for k in range(n_con):
        if targets[k] > possible[k] * (1 + 1e-12):
            raise ValueError(f"the budget asks to save {targets[k]:.4g} but at most {possible[k]:.4g} can be saved "
                             f"with these min_count settings ({names[k]})")
    scales = [max(float(s), 1e-300) for s in (scales if scales is not None else possible)]
    removed = [0] * n
    curves = [c.double().cpu().tolist() for c in curves]

    def marginal(j: int) -> float:
        k = removed[j]
        prev = curves[j][k - 1] if k else 0.0
        return curves[j][k] - prev

    # one heap per constraint; an entry is stale once its unit has lost another channel
    heaps = [[(marginal(j) / costs[k][j], j, 0) for j in range(n) if caps[j] > 0] for k in range(n_con)]
    for h in heaps:
        heapq.heapify(h)
    saved = [0.0] * n_con
    while True:
        gaps = [(targets[k] - saved[k]) / scales[k] for k in range(n_con)]
        k = max(range(n_con), key=lambda i: gaps[i]) if n_con else 0
        if not n_con or gaps[k] <= 0:
            break
        heap = heaps[k]
        while heap and heap[0][2] != removed[heap[0][1]]:
            heapq.heappop(heap)
        if not heap:
            break  # every unit at its floor
        _, j, _ = heapq.heappop(heap)
        removed[j] += 1
        for i in range(n_con):
            saved[i] += costs[i][j]
        if removed[j] < caps[j]:
            d = marginal(j)
            for i in range(n_con):
                heapq.heappush(heaps[i], (d / costs[i][j], j, removed[j]))
    return removed
