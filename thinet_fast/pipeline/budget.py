"""FLOPs and parameter budgets: widths from the greedy error curves (DESIGN §6).

``flops_target=`` and ``params_target=`` (either, or both) are each a fraction in (0, 1)
of the model's count or an absolute count (an int below it; FLOPs per image at the
calibration input size, parameters as :func:`~thinet_fast.count_params` counts them).
A budget sets the width of every *item* (:mod:`~thinet_fast.pipeline.budget_items`): a
plain unit's channels and, with ``coupled="prune"``, a coupled group's positions and an
attention module's heads. One statistics pass gives every item's greedy error curve
(:mod:`~thinet_fast.pipeline.budget_stats`); :func:`allocate` then

1. removes steps greedily by least error rise per unit of cost (what one step of an
   item saves at the unpruned widths; with two targets, for the target furthest from
   being met: :func:`~thinet_fast.ops.budget.allocate_budgets`), raising its savings
   goal while the count still misses a target (a conv that loses input and output
   channels saves less than the two steps' sum);
2. rounds to valid widths with ``round_to`` (:func:`~thinet_fast.pipeline.keeps.round_counts`);
3. repairs step by step (:func:`~thinet_fast.pipeline.budget_fit.fit_widths`): narrower
   while over a target, then wider into the slack that is left.

Every count is exact: :class:`~thinet_fast.pipeline.budget_items.CountModel` gives the
counts of any widths from one probe cut per item, and the result is counted again on a
cut shape-only copy (a disagreement refits on those exact counts).

Guarantee: when the ``min_keep`` floors allow it, every target is met (achieved <= the
target) and no item can keep one more valid width step without exceeding a target.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..counting import count_flops, count_params
from ..ops.budget import allocate_budgets
from ..ops.stats import Statistics
from ..units import Unit
from .budget_fit import fit_widths
from .budget_items import CountModel, Item, Shadow
from .keeps import min_counts, round_counts
from .methods import SelectContext, get_method

__all__ = ["Constraint", "Allocation", "budget_constraints", "error_curves", "allocate"]

KINDS = {"flops": ("flops_target", "FLOPs"), "params": ("params_target", "parameters")}
RULE = ("greedy removal by least error rise per unit of cost; with two targets, of the target furthest "
        "from being met (shortfall / model total); then exact counts: narrower while over, wider into slack")


@dataclass
class Constraint:
    """One budget: ``kind`` "flops" or "params", the option's value ``spec`` as given,
    the model's ``total`` count and the most the pruned model may have (``limit``)."""

    kind: str
    spec: float | int
    total: int
    limit: float
    costs: list[float] = field(default_factory=list)  # per item: what one step saves at the full widths

    @property
    def option(self) -> str:
        return KINDS[self.kind][0]


@dataclass
class Allocation:
    """What :func:`allocate` returns: the kept counts, the exact ``achieved`` and
    ``totals`` counts per kind ("flops", "params"), the constraints and a report note."""

    keep: dict[str, int]
    achieved: dict[str, int]
    totals: dict[str, int]
    constraints: list[Constraint]
    note: str
    min_keep: float

    def fraction(self, kind: str) -> float:
        return self.achieved[kind] / self.totals[kind]

    @property
    def met(self) -> bool:
        return all(self.achieved[c.kind] <= c.limit for c in self.constraints)

    def info(self) -> dict:
        """Plain values for the report's config: the allocation and each count against its target."""
        out = {"rule": RULE, "min_keep": self.min_keep, "keep": dict(self.keep), "met": self.met}
        by = {c.kind: c for c in self.constraints}
        for kind in KINDS:
            c = by.get(kind)
            out[kind] = {"target": None if c is None else c.spec, "limit": None if c is None else c.limit,
                         "achieved": self.achieved[kind], "total": self.totals[kind],
                         "fraction": round(self.fraction(kind), 6)}
        return out


def budget_constraints(model: nn.Module, example: torch.Tensor, *, flops_target=None,
                       params_target=None) -> list[Constraint]:
    """The constraints ``flops_target`` / ``params_target`` ask for on ``model`` (FLOPs of
    ``example``, batch 1 for per-image figures). An absolute count must be below the
    model's: ValueError naming the option otherwise."""
    out = []
    for kind, spec in (("flops", flops_target), ("params", params_target)):
        if spec is None:
            continue
        option, label = KINDS[kind]
        total = count_flops(model, example) if kind == "flops" else count_params(model)
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            if spec >= total:
                raise ValueError(f"{option}={spec} is not fewer than the model's {total:,} {label}: give a count "
                                 f"below {total:,} or a fraction in (0, 1)")
            limit = float(spec)
        else:
            limit = float(spec) * total
        out.append(Constraint(kind, spec, total, limit))
    if not out:
        raise ValueError("a budget needs flops_target= or params_target=")
    return out


def error_curves(units: list[Unit], stats: dict[str, Statistics], backend: str = "auto") -> list[torch.Tensor]:
    """Each unit's greedy error curve (relative error after removing 1, 2, ... channels)
    from the unpruned model's statistics ``stats`` (producer fqn -> Statistics)."""
    selections = get_method("thinet").run_many([stats[u.producer] for u in units], [u.channels for u in units],
                                               SelectContext(backend=backend))
    return [s.curve for s in selections]


def allocate(model: nn.Module, items: list[Item], curves: list[torch.Tensor], example: torch.Tensor, *,
             flops_target=None, params_target=None, min_keep: float = 0.1, rounds: int = 24,
             ignored_layers: Sequence[str] = (), skip: Sequence[str] = (), biases: Sequence[str] = ()
             ) -> Allocation:
    """Widths for ``items`` (:mod:`~thinet_fast.pipeline.budget_items`: plain units,
    then coupled groups, then attention heads) that meet ``flops_target`` and/or
    ``params_target`` with the least summed relative ThiNet error (the module docstring
    gives the rule). ``curves``: each item's greedy error curve (:func:`error_curves`,
    :func:`~thinet_fast.pipeline.budget_stats.item_curves`). Every item keeps at least
    :func:`~thinet_fast.pipeline.keeps.min_counts` (``min_keep``) and a valid width for
    its ``multiple``. ``ignored_layers`` / ``skip``: what the groups were found with;
    ``biases``: the layers the pipeline will give a bias
    (:func:`~thinet_fast.pipeline.budget_stats.new_biases`), counted from the start."""
    cons = budget_constraints(model, example, flops_target=flops_target, params_target=params_target)
    if len(curves) != len(items):
        raise ValueError(f"allocate: {len(curves)} error curves for {len(items)} items")
    found = dict(ignored_layers=ignored_layers, skip=skip, biases=biases)
    try:
        counter = CountModel(Shadow(model, example, **found), items)
    except (NotImplementedError, RuntimeError):  # a forward that needs data (e.g. nonzero): count a real copy
        counter = CountModel(Shadow(model, example, **found, device=example.device), items)
    for c in cons:
        c.costs = counter.step_costs(c.kind)
    kinds = tuple(c.kind for c in cons)
    limits, scales = {c.kind: c.limit for c in cons}, {c.kind: c.total for c in cons}
    mins = min_counts(items, min_keep)
    multiples = [it.multiple for it in items]
    keep = _greedy_keep(items, curves, cons, mins, lambda k: counter(k, kinds), rounds)
    if max(multiples, default=1) > 1:
        counts = round_counts([keep[it.producer] for it in items], [it.channels for it in items], multiples, mins)
        keep = dict(zip([it.producer for it in items], counts))
    keep, _ = fit_widths(items, keep, curves, mins, multiples, limits, lambda k: counter(k, kinds), scales=scales,
                         neighbours=counter.neighbours())
    achieved, fast = counter.exact(keep), counter(keep)
    # FLOPs per image can be fractions of a batch's (rounded): a disagreement of that size is no error
    exact_fit = any(abs(achieved[k] - fast[k]) > 1e-6 * max(achieved[k], 1) or fast[k] <= limits[k] < achieved[k]
                    for k in kinds)
    if exact_fit:  # the surrogate is off for this model: fit again, counting every step exactly
        keep, _ = fit_widths(items, keep, curves, mins, multiples, limits, lambda k: counter.exact(k, kinds),
                             scales=scales)
        achieved = counter.exact(keep)
    totals = {"flops": count_flops(model, example), "params": count_params(model)}
    alloc = Allocation(keep, achieved, totals, cons, "", min_keep)
    floor = None
    if not alloc.met:  # what the narrowest allowed widths reach: the rest is out of every item's reach
        floor = counter.exact({it.producer: m for it, m in zip(items, mins)}, kinds)
    alloc.note = _note(alloc, max(multiples, default=1), items, exact_fit, floor)
    return alloc


def _greedy_keep(units, curves, cons: list[Constraint], mins, count, rounds: int, bisect: int = 8):
    """Keep counts from the greedy allocation whose exact ``count`` meets every
    constraint when the floors allow. The per-channel costs overcount a conv that loses
    input and output channels, so each savings goal is raised by what the exact count
    still misses; the raise that meets may overshoot, so the goals are then bisected
    between the last that missed and the one that met."""
    caps = [sum(cost * (u.channels - m) for cost, u, m in zip(c.costs, units, mins)) for c in cons]

    def run(targets):
        removed = allocate_budgets(curves, [c.costs for c in cons], [min(t, cap) for t, cap in zip(targets, caps)],
                                   min_count=mins, scales=[c.total for c in cons], names=[c.option for c in cons])
        keep = {u.producer: u.channels - r for u, r in zip(units, removed)}
        return removed, keep, count(keep)

    def met(achieved):
        return all(achieved[c.kind] <= c.limit for c in cons)

    targets = [c.total - c.limit for c in cons]
    removed = missed = None
    for _ in range(rounds):
        last = removed
        removed, keep, achieved = run(targets)
        if met(achieved) or removed == last:  # met, or the floors stop any further removal
            break
        missed = list(targets)
        for i, c in enumerate(cons):
            short = achieved[c.kind] - c.limit
            if short > 0:  # past what this allocation already saves by the estimate: at least one more channel
                saved = sum(cost * r for cost, r in zip(c.costs, removed))
                targets[i] = max(targets[i] + short, saved + min(c.costs) * 0.5)
    if missed is not None and met(achieved):
        lo, hi = missed, targets
        for _ in range(bisect):
            if all(h - l < min(c.costs) * 0.5 for l, h, c in zip(lo, hi, cons)):
                break  # within half a channel of every goal
            mid = [(l + h) / 2 for l, h in zip(lo, hi)]
            _, k, a = run(mid)
            if met(a):
                hi, keep = mid, k
            else:
                lo = mid
    return keep


def _fmt(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}K" if v >= 1e3 else f"{v:.0f}"


def _note(alloc: Allocation, multiple: int, items=(), exact_fit: bool = False, floor=None) -> str:
    """The report's line: each count against its target, how the keep was allocated."""
    by = {c.kind: c for c in alloc.constraints}
    title = " and ".join({"flops": "FLOPs", "params": "params"}[k] for k in by) + " budget"
    parts = []
    for kind, (option, label) in KINDS.items():
        frac, got, total = alloc.fraction(kind), alloc.achieved[kind], alloc.totals[kind]
        if kind in by:
            c = by[kind]
            parts.append(f"{option} {c.spec}: achieved {frac:.3f} (target {c.limit / total:.3f}), "
                         f"{_fmt(got)} of {_fmt(total)} {label}")
        else:
            parts.append(f"{label} kept {frac:.3f} ({_fmt(got)} of {_fmt(total)}, no target)")
    rounded = f", rounded to multiples of {multiple} (round_to)" if multiple > 1 else ""
    kinds = {"unit": "plain units", "group": "coupled groups", "heads": "attention sites"}
    over = ", ".join(f"{sum(it.kind == k for it in items)} {label}" for k, label in kinds.items()
                     if any(it.kind == k for it in items))
    note = (f"{title}: " + "; ".join(parts) + f"; widths allocated over {over or 'nothing'} from the greedy error "
            f"curves (min_keep {alloc.min_keep}){rounded}")
    if exact_fit:
        note += "; fitted on exact counts (the fast count disagreed for this model)"
    missed = [c.option for c in alloc.constraints if alloc.achieved[c.kind] > c.limit]
    if missed:
        note += f"; the budget could not be met within min_keep={alloc.min_keep}{rounded} ({', '.join(missed)})"
        if floor is not None:
            note += ("; every item at its min_keep floor still leaves " + ", ".join(
                f"{_fmt(floor[k])} {KINDS[k][1]} ({floor[k] / alloc.totals[k]:.3f})" for k in floor)
                + ": the rest sits in layers no prunable unit, group or head reaches")
    return note
