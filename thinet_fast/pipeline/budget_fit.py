"""The exact repair after a budget allocation: whole valid-width steps, counted exactly.

The greedy allocation (:func:`thinet_fast.ops.budget.allocate_budgets`) works with
per-step costs at the unpruned widths, which are estimates: a conv that loses input and
output channels saves their product once, and ``round_to`` rounding moves counts by
whole steps. :func:`fit_widths` brings the counts within every limit, counting each
candidate step exactly, then widens items (units, coupled groups, attention heads) into
the slack that is left, so that no single step of any item fits any more (with
``multiple`` = 1: no unit could keep one more channel without exceeding a target).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from .keeps import lower_width, per_item, upper_width

__all__ = ["fit_widths"]


def fit_widths(units: Sequence, keep: dict[str, int], curves, mins: Sequence[int], multiple,
               limits: Mapping[str, float], count: Callable[[dict[str, int]], dict[str, int]],
               scales: Mapping[str, float] | None = None, neighbours: Sequence[set[int]] | None = None):
    """Counts ``keep`` brought within ``limits`` (kind -> most allowed count, e.g.
    ``{"flops": ..., "params": ...}``), one valid-width step at a time, each step's
    counts from ``count(keep)`` (exact).

    Down, while any limit is exceeded: a step that alone meets every limit with the
    least error rise (on the greedy curves), else, for the limit exceeded most (relative
    to ``scales[kind]``, e.g. the model's total count; default the limit), the least
    error rise per unit of it saved; stops when every unit is at its floor (``mins``).
    Then up, while a step still fits every limit: the most error removed per share of
    the tightest remaining slack. ``neighbours`` (per item, the items whose steps change
    what its step costs: :meth:`~thinet_fast.pipeline.budget_items.CountModel.neighbours`)
    lets the up phase re-count only the steps a change can affect; the chosen step is always counted
    exactly, and before stopping every step is, so the result does not depend on it.
    ``units`` may be any items with ``producer`` and ``channels`` (a budget's
    :class:`~thinet_fast.pipeline.budget_items.Item`); ``multiple``: one for all, or one
    per unit. Returns (keep, counts)."""
    multiples = per_item(multiple, len(units), "fit_widths: multiple")
    curves = [c.double().cpu().tolist() for c in curves]
    kinds = list(limits)
    scales = {k: max(float((scales or limits)[k]), 1.0) for k in kinds}

    def error(j, n):  # relative error of unit j keeping n of its channels
        removed = units[j].channels - n
        return curves[j][removed - 1] if removed else 0.0

    def step(j, up):  # (unit, new width, its counts, error change) for unit j's next width, or None
        u, n = units[j], keep[units[j].producer]
        w = upper_width(n, u.channels, multiples[j]) if up else lower_width(n, u.channels, multiples[j], mins[j])
        return None if w is None else (u.producer, w, count({**keep, u.producer: w}), error(j, w) - error(j, n))

    def fits(counts):
        return all(counts[k] <= limits[k] for k in kinds)

    achieved = count(keep)
    while not fits(achieved):
        options = [o for o in (step(j, False) for j in range(len(units))) if o is not None]
        if not options:
            break
        meeting = [o for o in options if fits(o[2])]
        if meeting:
            choice = min(meeting, key=lambda o: o[3])
        else:  # the most violated limit decides what a step is worth
            worst = max(kinds, key=lambda k: (achieved[k] - limits[k]) / scales[k])
            choice = min(options, key=lambda o: o[3] / max(achieved[worst] - o[2][worst], 1))
        p, w, achieved, _ = choice
        keep[p] = w
    return _widen(units, keep, achieved, step, fits, kinds, limits, neighbours)


def _widen(units, keep, achieved, step, fits, kinds, limits, neighbours):
    """The up phase of :func:`fit_widths`. Steps are cached as count changes; after a
    step of unit p only p and its neighbours are re-counted (a bilinear count changes
    only there), and every step is re-counted before giving up, so stale caches cannot
    hide a step that fits."""
    every = set(range(len(units)))
    delta: dict[int, tuple | None] = {}  # unit -> (width, count change, error change) or None
    dirty, checked = set(every), False
    while fits(achieved):
        for j in dirty:
            o = step(j, True)
            delta[j] = None if o is None else (o[1], {k: o[2][k] - achieved[k] for k in kinds}, o[3])
        options = [(j, d[0], {k: achieved[k] + d[1][k] for k in kinds}, d[2])
                   for j, d in delta.items() if d is not None]
        options = [o for o in options if fits(o[2])]
        if not options:
            if checked or neighbours is None:
                break
            dirty, checked = set(every), True  # every step counted afresh before stopping
            continue
        slack = {k: max(limits[k] - achieved[k], 1) for k in kinds}

        def share(o):  # the largest share of any limit's remaining slack this step uses
            return max(max(o[2][k] - achieved[k], 1) / slack[k] for k in kinds)

        j, w, predicted, _ = min(options, key=lambda o: o[3] / share(o))
        exact = step(j, True)[2] if neighbours is not None and j not in dirty else predicted
        if exact != predicted:  # a cached count was stale: count every step afresh
            dirty, checked = set(every), False
            continue
        keep[units[j].producer] = w
        achieved = exact
        dirty = every if neighbours is None else {j} | set(neighbours[j])
        checked = neighbours is None
    return keep, achieved
