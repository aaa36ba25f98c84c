"""Keep policies: how many channels each unit keeps, as ``{producer fqn: n_keep}``.

One rounding rule per policy:

- :func:`uniform` (``keep=0.5``): ``round(C · fraction)``, at least 1.
- :func:`per_unit` (``keep={"features.0": 0.25, "features.2": 40}``): a fraction rounds
  like :func:`uniform`; an int is the exact count (at most C).
- :func:`from_preset` (``preset=``): the preset's own rule, ``floor(C · fraction)`` by
  default, as in the paper's tables (see :mod:`thinet_fast.presets`).
- the budget (``flops_target=`` and/or ``params_target=``,
  :func:`thinet_fast.pipeline.budget.allocate`): allocated from the greedy error curves,
  each unit keeping at least :func:`min_counts` (``round(C · min_keep)``, at least 1).

Hardware-friendly widths (``round_to=N``, :func:`round_multiple`) then move each count
to the nearest *valid width* (:func:`valid_widths`): a multiple of N in [N, C], or C
itself (the unpruned width is always valid, also when C is not a multiple of N). A unit
narrower than N keeps its count. Ties go to the wider count. They apply to fractions
(uniform, per-unit, coupled groups) and to the budget (rounded after the allocation,
then narrowed, or widened into slack, by whole steps: see ``budget.allocate``). An explicit
int in a ``keep`` dict is the user's exact wish and is left as given; so are the
presets' widths unless ``round_to`` is an explicit int. A coupled group of aligned
blocks rounds its whole width (``pipeline.coupled._n_keep``).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..units import UnitPlan

__all__ = ["n_keep_for", "uniform", "per_unit", "from_preset", "min_counts", "for_config", "round_multiple",
           "valid_widths", "round_count", "round_counts", "lower_width", "upper_width", "AUTO_ROUND_TO"]

#: the channel multiple ``round_to="auto"`` gives on CUDA (tensor-core friendly widths)
AUTO_ROUND_TO = 8


def n_keep_for(channels: int, keep: float | int, who: str = "keep", multiple: int = 1) -> int:
    """Channels kept for a fraction (rounded to nearest, at least 1, then to a valid
    width for ``multiple``) or an explicit count (as given)."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        if keep > channels:
            raise ValueError(f"{who}={keep} asks for more channels than the producer has ({channels})")
        return keep
    return round_count(max(1, min(channels, int(round(channels * float(keep))))), channels, multiple)


def round_multiple(round_to, device=None, *, preset: bool = False) -> int:
    """The channel multiple ``PruneConfig.round_to`` asks for on ``device``: ``"auto"``
    is :data:`AUTO_ROUND_TO` on CUDA and 1 elsewhere; None is 1. With a preset only an
    explicit int rounds (``"auto"`` keeps the paper's widths)."""
    if round_to is None:
        return 1
    if round_to == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return AUTO_ROUND_TO if on_cuda and not preset else 1
    return int(round_to)


def valid_widths(channels: int, multiple: int) -> list[int]:
    """Every width a unit of ``channels`` may keep under ``multiple``, ascending."""
    if multiple <= 1 or channels < multiple:
        return list(range(1, channels + 1))
    widths = list(range(multiple, channels + 1, multiple))
    return widths if widths[-1] == channels else widths + [channels]


def round_count(count: int, channels: int, multiple: int, floor: int = 1) -> int:
    """``count`` moved to the nearest valid width (ties: the wider one) that is at least
    ``floor``; a unit narrower than ``multiple`` (or ``multiple`` <= 1) keeps ``count``."""
    if multiple <= 1 or channels < multiple:
        return count
    widths = [w for w in valid_widths(channels, multiple) if w >= floor] or [channels]
    return min(widths, key=lambda w: (abs(w - count), -w))


def round_counts(counts: Sequence[int], channels: Sequence[int], multiple: int | Sequence[int],
                 floors: Sequence[int] | None = None) -> list[int]:
    """Each ``counts[i]`` (channels kept of ``channels[i]``) as :func:`round_count`
    rounds it: the nearest multiple of ``multiple`` (one for all, or one per unit) in
    [multiple, channels[i]] or ``channels[i]`` itself, ties to the wider; counts of units
    narrower than ``multiple`` unchanged. ``floors``: a least count per unit (rounded up
    to a valid width when rounding would go below it)."""
    multiples = per_item(multiple, len(counts), "round_counts: multiple")
    if len(counts) != len(channels) or (floors is not None and len(floors) != len(counts)):
        raise ValueError(f"round_counts: {len(counts)} counts for {len(channels)} channel counts")
    floors = [1] * len(counts) if floors is None else floors
    return [round_count(int(n), int(c), int(m), int(f)) for n, c, m, f in zip(counts, channels, multiples, floors)]


def block_multiple(multiple: int, blocks: int) -> int:
    """The multiple a group's positions per block keep so that its whole width
    (positions × ``blocks``) is a multiple of ``multiple``: N / gcd(N, blocks)."""
    return multiple // math.gcd(multiple, blocks)


def per_item(value: int | Sequence[int], n: int, who: str) -> list[int]:
    """``value`` for each of ``n`` items: one int for all, or a list of ``n``."""
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{who} gives {len(value)} values for {n} items")
    return value


def lower_width(count: int, channels: int, multiple: int, floor: int = 1) -> int | None:
    """The next valid width below ``count`` that is at least ``floor``, or None."""
    below = [w for w in valid_widths(channels, multiple) if floor <= w < count]
    return below[-1] if below else None


def upper_width(count: int, channels: int, multiple: int) -> int | None:
    """The next valid width above ``count``, or None."""
    above = [w for w in valid_widths(channels, multiple) if w > count]
    return above[0] if above else None


def uniform(plan: UnitPlan, fraction: float, multiple: int = 1) -> dict[str, int]:
    return {u.producer: n_keep_for(u.channels, float(fraction), multiple=multiple) for u in plan.units}


def per_unit(plan: UnitPlan, keep: Mapping[str, float | int], multiple: int = 1) -> dict[str, int]:
    return {u.producer: n_keep_for(u.channels, keep[u.producer], f"keep[{u.producer!r}]", multiple)
            for u in plan.units}


def from_preset(plan: UnitPlan, preset, multiple: int = 1) -> dict[str, int]:
    counts = preset.keep_for(plan)
    channels = {u.producer: u.channels for u in plan.units}
    return {p: round_count(n, channels[p], multiple) for p, n in counts.items()}


def min_counts(plan_units, min_keep: float) -> list[int]:
    """The budget's floor per unit (``flops_target`` / ``params_target``)."""
    return [max(1, int(round(min_keep * u.channels))) for u in plan_units]


def for_config(plan: UnitPlan, cfg, preset=None, device=None) -> dict[str, int]:
    """The counts ``cfg`` asks for (every policy but the budget, which needs statistics),
    rounded as ``cfg.round_to`` says on ``device``."""
    multiple = round_multiple(cfg.round_to, device, preset=preset is not None)
    if preset is not None:
        return from_preset(plan, preset, multiple)
    keep = 0.5 if cfg.keep is None else cfg.keep
    return per_unit(plan, keep, multiple) if isinstance(keep, Mapping) else uniform(plan, keep, multiple)
