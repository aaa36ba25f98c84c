"""FLOPs budgets: per-unit keep counts from the greedy error curves (DESIGN §6)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..counting import count_flops, profile
from ..ops.budget import allocate_budget
from ..rewrite import prune_unit_
from ..units import Unit, get_module
from ..ops.stats import Statistics
from .keeps import lower_width, min_counts, round_counts, upper_width
from .methods import SelectContext, get_method


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


def _flops_with(model: nn.Module, units: list[Unit], keep: dict[str, int], example: torch.Tensor) -> int:
    """FLOPs of the model cut to ``keep`` (shapes only, on the meta device)."""
    shadow = copy.deepcopy(model).to("meta")
    for u in units:
        prune_unit_(shadow, u, torch.arange(keep[u.producer]))
    return count_flops(shadow, example.to("meta"))


def allocate_flops(model: nn.Module, units: list[Unit], stats: dict[str, Statistics], example: torch.Tensor, *,
                   flops_target: float, min_keep: float, backend: str = "auto", rounds: int = 24,
                   multiple: int = 1):
    """Keep counts that bring the model to ``flops_target`` × its FLOPs with the least
    summed relative ThiNet error, from the unpruned model's statistics ``stats``
    (producer fqn -> Statistics). ``multiple`` > 1 (``round_to``): the allocation is
    then rounded to valid widths (:func:`~thinet_fast.pipeline.keeps.round_counts`,
    not below ``min_keep``) and :func:`_fit_rounded` narrows or widens units by whole
    steps until the target is met with as little slack as the steps allow. Returns
    (keep dict, achieved FLOPs fraction, note)."""
    selections = get_method("thinet").run_many([stats[u.producer] for u in units], [u.channels for u in units],
                                               SelectContext(backend=backend))
    curves = [s.curve for s in selections]
    costs = _channel_costs(model, units, example)
    total = count_flops(model, example)
    shadow = copy.deepcopy(model).to("meta")  # copied once: copies of a meta model are cheap
    mins = min_counts(units, min_keep)
    goal = (1.0 - flops_target) * total
    target = goal
    for _ in range(rounds):
        # per-channel costs add up to more than the joint saving (a conv that loses input
        # and output channels saves their product once), so raise the target until the
        # real count meets the budget
        removed = allocate_budget(curves, costs, min(target, sum(c * (u.channels - m) for c, u, m in
                                                              zip(costs, units, mins))), min_count=mins)
        keep = {u.producer: u.channels - r for u, r in zip(units, removed)}
        achieved = _flops_with(shadow, units, keep, example)
        short = achieved - flops_target * total
        if short <= 0:
            break
        # past what this allocation already saves by the estimate: at least one more channel
        target = max(target + short, sum(c * r for c, r in zip(costs, removed)) + min(costs) * 0.5)
    rounded = ""
    if multiple > 1:
        counts = round_counts([keep[u.producer] for u in units], [u.channels for u in units], multiple, mins)
        keep, achieved = _fit_rounded(shadow, units, dict(zip([u.producer for u in units], counts)), curves,
                                      mins, multiple, example, flops_target * total)
        rounded = f", rounded to multiples of {multiple} (round_to)"
    frac = achieved / total
    note = (f"FLOPs budget {flops_target:.3f}: kept {frac:.3f} of {total / 1e6:.2f}M FLOPs "
            f"(min_keep {min_keep}); per-unit keep allocated from the greedy error curves{rounded}")
    if frac > flops_target + 1e-9:
        note += f"; the budget could not be met within min_keep={min_keep}{rounded}"
    return keep, frac, note


def _fit_rounded(shadow, units, keep, curves, mins, multiple, example, limit):
    """Rounded widths brought within ``limit`` FLOPs, one valid-width step at a time,
    each step's FLOPs counted exactly. Down, while over: a step that alone meets the
    limit with the least error rise (on the greedy curves), else the least rise per
    FLOP saved; stops when every unit is at its floor. Then up, while a step still fits:
    the most error removed per FLOP added. Returns (keep, achieved FLOPs)."""
    curves = [c.double().cpu().tolist() for c in curves]

    def error(j, n):  # relative error of unit j keeping n of its channels
        removed = units[j].channels - n
        return curves[j][removed - 1] if removed else 0.0

    def steps(up):  # (unit, new width, its FLOPs, error change) for each unit's next width
        out = []
        for j, (u, m) in enumerate(zip(units, mins)):
            n = keep[u.producer]
            w = upper_width(n, u.channels, multiple) if up else lower_width(n, u.channels, multiple, m)
            if w is not None:
                out.append((u.producer, w, _flops_with(shadow, units, {**keep, u.producer: w}, example),
                            error(j, w) - error(j, n)))
        return out

    achieved = _flops_with(shadow, units, keep, example)
    while achieved > limit:
        options = steps(up=False)
        if not options:
            break
        meeting = [o for o in options if o[2] <= limit]
        p, w, achieved, _ = min(meeting, key=lambda o: o[3]) if meeting else \
            min(options, key=lambda o: o[3] / max(achieved - o[2], 1))
        keep[p] = w
    while achieved <= limit:
        options = [o for o in steps(up=True) if o[2] <= limit]
        if not options:
            break
        p, w, achieved, _ = min(options, key=lambda o: o[3] / max(o[2] - achieved, 1))
        keep[p] = w
    return keep, achieved
