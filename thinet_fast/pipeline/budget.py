"""FLOPs and parameter budgets: per-unit keep counts from the greedy error curves (DESIGN §6).

``flops_target=`` and ``params_target=`` (either, or both) are each a fraction in (0, 1)
of the model's count or an absolute count (an int below it; FLOPs per image at the
calibration input size, parameters as :func:`~thinet_fast.count_params` counts them).
One statistics pass gives every unit's greedy error curve; :func:`allocate` then

1. removes channels greedily by least error rise per unit of cost (a unit's marginal
   FLOPs and/or parameters per channel at the unpruned widths; with two targets, for
   the target furthest from being met: :func:`~thinet_fast.ops.budget.allocate_budgets`),
   raising its savings goal while the exact count still misses a target (the
   per-channel estimates overcount a conv that loses input and output channels);
2. rounds to valid widths with ``round_to`` (:func:`~thinet_fast.pipeline.keeps.round_counts`);
3. repairs with exact counts (:func:`~thinet_fast.pipeline.budget_fit.fit_widths`):
   narrower while over a target, then wider into the slack that is left.

Guarantee: when the ``min_keep`` floors allow it, every target is met (achieved <= the
target) and no unit can keep one more valid width step without exceeding a target.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from ..counting import count_flops, count_params, profile
from ..ops.budget import allocate_budgets
from ..ops.stats import Statistics
from ..rewrite import prune_unit_
from ..units import Unit, get_module
from .budget_fit import fit_widths, unit_neighbours
from .keeps import min_counts, round_counts
from .methods import SelectContext, get_method

__all__ = ["Constraint", "Allocation", "budget_constraints", "error_curves", "allocate", "allocate_flops"]

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
    costs: list[float] = field(default_factory=list)  # per unit: what one channel costs (estimate)

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


def _channel_costs(model: nn.Module, units: list[Unit], example: torch.Tensor) -> list[float]:
    """FLOPs one channel of each unit costs at the current widths: its producer filter,
    plus its share of the consumer's input (and of a depthwise follower)."""
    layers = {lc.name: lc.flops for lc in profile(model, example).layers}
    costs = []
    for u in units:
        cost = layers.get(u.producer, 0) / u.channels + layers.get(u.consumer, 0) / u.channels
        for f in u.followers:
            if isinstance(get_module(model, f), nn.Conv2d):
                cost += layers.get(f, 0) / u.channels
        costs.append(max(cost, 1.0))
    return costs


def _param_costs(model: nn.Module, units: list[Unit]) -> list[float]:
    """Parameters one channel of each unit costs at the current widths: its producer
    filter (and bias), the per-channel parameters of its followers (BatchNorm, a
    depthwise conv, PReLU), and its slice of the consumer's weight."""
    costs = []
    for u in units:
        per_channel = 0
        for fqn in (u.producer, *u.followers):
            # only tensors indexed by the channel shrink (a shared PReLU slope does not)
            per_channel += sum(p.numel() for p in get_module(model, fqn).parameters(recurse=False)
                               if p.dim() and p.shape[0] == u.channels)
        cost = per_channel / u.channels + get_module(model, u.consumer).weight.numel() / u.channels
        costs.append(max(cost, 1.0))
    return costs


def _counts_with(model: nn.Module, units: list[Unit], keep: dict[str, int], example: torch.Tensor,
                 kinds=("flops",)) -> dict[str, int]:
    """Exact counts (``kinds`` of "flops", "params") of the model cut to ``keep``
    (shapes only, on the meta device)."""
    shadow = copy.deepcopy(model).to("meta")
    for u in units:
        prune_unit_(shadow, u, torch.arange(keep[u.producer]))
    out = {}
    if "flops" in kinds:
        out["flops"] = count_flops(shadow, example.to("meta"))
    if "params" in kinds:
        out["params"] = count_params(shadow)
    return out


def _flops_with(model: nn.Module, units: list[Unit], keep: dict[str, int], example: torch.Tensor) -> int:
    """FLOPs of the model cut to ``keep`` (shapes only, on the meta device)."""
    return _counts_with(model, units, keep, example, ("flops",))["flops"]


def error_curves(units: list[Unit], stats: dict[str, Statistics], backend: str = "auto") -> list[torch.Tensor]:
    """Each unit's greedy error curve (relative error after removing 1, 2, ... channels)
    from the unpruned model's statistics ``stats`` (producer fqn -> Statistics)."""
    selections = get_method("thinet").run_many([stats[u.producer] for u in units], [u.channels for u in units],
                                               SelectContext(backend=backend))
    return [s.curve for s in selections]


def allocate(model: nn.Module, units: list[Unit], stats: dict[str, Statistics], example: torch.Tensor, *,
             flops_target=None, params_target=None, min_keep: float = 0.1, backend: str = "auto",
             rounds: int = 24, multiple: int = 1, curves: list[torch.Tensor] | None = None) -> Allocation:
    """Keep counts that meet ``flops_target`` and/or ``params_target`` with the least
    summed relative ThiNet error (see the module docstring for the rule), every unit
    keeping at least :func:`~thinet_fast.pipeline.keeps.min_counts` (``min_keep``) and,
    with ``multiple`` > 1 (``round_to``), a valid width. ``curves``: the greedy error
    curves, when already computed (:func:`error_curves`)."""
    cons = budget_constraints(model, example, flops_target=flops_target, params_target=params_target)
    curves = error_curves(units, stats, backend) if curves is None else curves
    for c in cons:
        c.costs = _channel_costs(model, units, example) if c.kind == "flops" else _param_costs(model, units)
    shadow = copy.deepcopy(model).to("meta")  # copied once: copies of a meta model are cheap
    kinds = tuple(c.kind for c in cons)
    count = lambda keep: _counts_with(shadow, units, keep, example, kinds)  # noqa: E731
    mins = min_counts(units, min_keep)
    keep = _greedy_keep(units, curves, cons, mins, count, rounds)
    if multiple > 1:
        counts = round_counts([keep[u.producer] for u in units], [u.channels for u in units], multiple, mins)
        keep = dict(zip([u.producer for u in units], counts))
    keep, _ = fit_widths(units, keep, curves, mins, multiple, {c.kind: c.limit for c in cons}, count,
                         scales={c.kind: c.total for c in cons}, neighbours=unit_neighbours(units))
    achieved = _counts_with(shadow, units, keep, example, tuple(KINDS))
    totals = {"flops": count_flops(model, example), "params": count_params(model)}
    alloc = Allocation(keep, achieved, totals, cons, "", min_keep)
    alloc.note = _note(alloc, multiple)
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


def _note(alloc: Allocation, multiple: int) -> str:
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
    note = (f"{title}: " + "; ".join(parts) + f"; per-unit keep allocated from the greedy error curves "
            f"(min_keep {alloc.min_keep}){rounded}")
    missed = [c.option for c in alloc.constraints if alloc.achieved[c.kind] > c.limit]
    if missed:
        note += f"; the budget could not be met within min_keep={alloc.min_keep}{rounded} ({', '.join(missed)})"
    return note


def allocate_flops(model: nn.Module, units: list[Unit], stats: dict[str, Statistics], example: torch.Tensor, *,
                   flops_target: float, min_keep: float, backend: str = "auto", rounds: int = 24,
                   multiple: int = 1):
    """The FLOPs-only form of :func:`allocate`: (keep dict, achieved FLOPs fraction, note)."""
    alloc = allocate(model, units, stats, example, flops_target=flops_target, min_keep=min_keep, backend=backend,
                     rounds=rounds, multiple=multiple)
    return alloc.keep, alloc.fraction("flops"), alloc.note
